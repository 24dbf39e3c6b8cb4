"""Exact cost per request, the ledger, the official openai client, and upstream keys kept secret."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import UPSTREAM_KEY, remote

CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}

# gpt-4o-mini at the catalog's current price, by hand: $0.15/M input, $0.075/M cached input, $0.60/M output.
# The fake upstream reports 1000 prompt tokens (200 cached) and 80 completion tokens (30 of them reasoning).
HAND_PRICE_USD = (Decimal(800) * Decimal("0.15") + Decimal(200) * Decimal("0.075")
                  + Decimal(80) * Decimal("0.60")) / Decimal(1_000_000)


def ledger_rows(server) -> list[dict]:
    return server.app.state.gateway.ledger.rows()


def test_cost_header_equals_the_hand_computed_price(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    response = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert Decimal(response.headers["x-selfhost-cost-usd"]) == HAND_PRICE_USD
    [row] = ledger_rows(server)
    assert row["request_id"] == response.headers["x-selfhost-request-id"]
    assert Decimal(row["cost_usd"]) == HAND_PRICE_USD
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (
        1000, 200, 50, 30)
    assert (row["model"], row["deployment"], row["upstream_model"], row["status"]) == (
        "gpt", "gpt/0", "gpt-4o-mini", "completed")
    assert row["price_model"] == "openai/gpt-4o-mini" and row["price_source"] and row["price_as_of"]
    assert row["usage_estimated"] is False


def test_unknown_model_is_unpriced_not_free(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url, model="house-model-7b"))
    response = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert response.headers["x-selfhost-cost-usd"] == "unpriced"
    [row] = ledger_rows(server)
    assert row["cost_usd"] is None and "no price source" in row["unpriced_reason"]


def test_price_model_overrides_the_upstream_id(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url, model="my-finetune", price_model="gpt-4o-mini"))
    response = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert Decimal(response.headers["x-selfhost-cost-usd"]) == HAND_PRICE_USD


def test_streamed_request_is_priced_from_its_usage_chunk(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        comment = next(line for line in response.iter_lines() if line.startswith(": x-selfhost-cost-usd="))
    assert Decimal(comment.split("=", 1)[1]) == HAND_PRICE_USD
    [row] = ledger_rows(server)
    assert Decimal(row["cost_usd"]) == HAND_PRICE_USD and row["status"] == "completed"


def test_interrupted_stream_charges_only_what_the_client_received(gateway, upstreams):
    upstreams[0].mode = "drop"
    server = gateway(remote("gpt", upstreams[0].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        response.read()
    [row] = ledger_rows(server)
    assert row["status"] == "interrupted" and row["usage_estimated"] is True
    assert row["output_tokens"] == 2  # two chunks reached the client
    assert Decimal(row["cost_usd"]) > 0


def test_failed_attempts_are_not_charged(gateway, upstreams):
    upstreams[0].mode = "500"
    server = gateway(remote("gpt", upstreams[0].url) + remote("gpt", upstreams[1].url))
    httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert [row["deployment"] for row in ledger_rows(server)] == ["gpt/1"]


def test_official_openai_client_through_the_gateway(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url) + remote("embed", upstreams[1].url, model="text-embedding-3-small"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-selfhost-backend"] == "gpt/0"
    assert raw.parse().choices[0].message.content == "Hello from upstream a"
    stream = client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello from upstream"
    assert chunks[-1].usage.completion_tokens == 80  # asked for, so relayed
    assert client.embeddings.create(model="embed", input="hi").data[0].embedding == [0.1, 0.2, 0.3]
    assert len(ledger_rows(server)) == 3


def test_openai_client_sees_a_mid_stream_failure_as_an_error(gateway, upstreams):
    upstreams[0].mode = "drop"
    server = gateway(remote("gpt", upstreams[0].url))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        list(stream)


def test_upstream_key_never_reaches_logs_errors_or_the_ledger(gateway, upstreams, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    upstreams[1].mode = "500"
    upstreams[2].mode = "drop"
    server = gateway(remote("gpt", upstreams[1].url) + remote("gpt", upstreams[0].url)
                     + remote("broken", upstreams[2].url))
    answers = [httpx.post(server.url + "/v1/chat/completions", json=CHAT).text]
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={**CHAT, "model": "broken", "stream": True}) as response:
        answers.append(response.read().decode())
    upstreams[1].mode = upstreams[0].mode = "500"
    answers.append(httpx.post(server.url + "/v1/chat/completions", json=CHAT).text)
    assert upstreams[0].received[0][0]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # it was sent...
    server.stop()  # ...and nowhere else: logs, answers, the ledger file (WAL checkpointed on close)
    assert "deployment gpt/0 failed before its first byte" in caplog.text
    assert UPSTREAM_KEY not in caplog.text
    assert all(UPSTREAM_KEY not in answer for answer in answers)
    for path in Path(tmp_path).glob("ledger.db*"):
        assert UPSTREAM_KEY.encode() not in path.read_bytes()
