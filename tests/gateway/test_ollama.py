"""The Ollama API over a remote OpenAI-compatible deployment, with the official `ollama` client."""

from __future__ import annotations

from decimal import Decimal

import httpx
import ollama
import pytest

from tests.gateway.conftest import remote
from tests.gateway.test_cost import HAND_PRICE_USD


@pytest.fixture
def server(gateway, upstreams):
    return gateway(remote("gpt", upstreams[0].url))


def test_ollama_client_chat_and_generate(server, upstreams):
    client = ollama.Client(host=server.url)
    answer = client.chat(model="gpt", messages=[{"role": "user", "content": "hi"}], stream=False,
                         options={"num_predict": 7, "temperature": 0.1})
    assert answer.message.content == "Hello from upstream a"
    assert (answer.prompt_eval_count, answer.eval_count, answer.done) == (1000, 80, True)
    sent = upstreams[0].received[0][1]
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("gpt-4o-mini", 7, 0.1)
    streamed = list(client.chat(model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(part.message.content for part in streamed) == "Hello from upstream"
    assert streamed[-1].done and streamed[-1].eval_count == 80
    generated = client.generate(model="gpt", prompt="hi", system="be brief", stream=False)
    assert generated.response == "Hello from upstream a"
    assert upstreams[0].received[-1][1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_ollama_answers_carry_backend_and_cost(server):
    response = httpx.post(server.url + "/api/chat", json={"model": "gpt", "stream": False,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["x-selfhost-backend"] == "gpt/0"
    assert Decimal(response.headers["x-selfhost-cost-usd"]) == HAND_PRICE_USD
    assert len(server.app.state.gateway.ledger.rows()) == 1


def test_ollama_errors_keep_the_ollama_shape(server, upstreams):
    bad = httpx.post(server.url + "/api/chat", json={"model": "gpt", "messages": [{"role": "robot"}]})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    tools = httpx.post(server.url + "/api/chat", json={"model": "gpt", "messages": [], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert tools.status_code == 400 and "not supported yet" in tools.json()["error"]
    upstreams[0].mode = "drop"
    with httpx.stream("POST", server.url + "/api/chat", json={"model": "gpt", "messages": [
            {"role": "user", "content": "hi"}]}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"error"' in lines[-1] and "mid-stream" in lines[-1]
    assert upstreams[1].received == []
