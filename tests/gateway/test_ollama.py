"""The Ollama API over a remote OpenAI-compatible deployment, with the official `ollama` client."""

from __future__ import annotations

from decimal import Decimal

import httpx
import ollama
import pytest

from tests.gateway.conftest import remote
from tests.gateway.fake_upstream import TOOL_ARGUMENTS
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
    orphan = httpx.post(server.url + "/api/chat", json={"model": "gpt", "messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "content": "21", "tool_name": "get_weather"}]})
    assert orphan.status_code == 400 and "answers no earlier tool call" in orphan.json()["error"]
    upstreams[0].mode = "drop"
    with httpx.stream("POST", server.url + "/api/chat", json={"model": "gpt", "messages": [
            {"role": "user", "content": "hi"}]}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"error"' in lines[-1] and "mid-stream" in lines[-1]
    assert upstreams[1].received == []


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_ollama_tool_calls_through_a_remote_model(server, upstreams):
    """Ollama's tools reach the upstream as OpenAI's; its calls come back Ollama's way (arguments an object),
    streamed ones once their pieces are joined; a conversation's calls and results get matching ids."""
    client = ollama.Client(host=server.url)
    asked = [{"role": "user", "content": "weather in Paris?"}]
    answer = client.chat(model="gpt", messages=asked, tools=[WEATHER], stream=False)
    assert [(c.function.name, dict(c.function.arguments)) for c in answer.message.tool_calls] == [
        ("get_weather", TOOL_ARGUMENTS)]
    assert upstreams[0].received[-1][1]["tools"] == [WEATHER]
    streamed = list(client.chat(model="gpt", messages=asked, tools=[WEATHER], stream=True))
    calls = [c for part in streamed for c in part.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", TOOL_ARGUMENTS)]
    assert streamed[-1].done and streamed[-1].eval_count == 80
    # The next turn: the call and its result, as the Ollama client sends them back.
    conversation = asked + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "21 C"}]
    client.chat(model="gpt", messages=conversation, tools=[WEATHER], stream=False)
    sent = upstreams[0].received[-1][1]["messages"]
    assert [c["function"] for c in sent[1]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_time", "arguments": "{}"}]
    ids = [c["id"] for c in sent[1]["tool_calls"]]
    assert len(set(ids)) == 2
    assert [(m["role"], m["tool_call_id"]) for m in sent[2:]] == [("tool", ids[1]), ("tool", ids[0])]
