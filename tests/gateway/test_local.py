"""Local and remote models side by side: local names keep selfhost's own routes; a local fallback catches
every remote failure."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from tests.gateway.conftest import refused_url, remote


@pytest.fixture
def mixed(gateway, upstreams, tiny_checkpoint):
    local = (f'\n[[models]]\nname = "tiny"\npath = "{tiny_checkpoint("llama")}"\n[models.cost]\n'
             'rent_usd_per_hour = 0.72\nthroughput_tok_s = 100\n')  # $0.72/h over 100 tok/s: $0.000002 a token
    return gateway(local + remote("gpt", upstreams[0].url) + remote("flaky", refused_url(), fallbacks=["tiny"]),
                   kv_cache_memory="64MiB", weight_dtype="float32")


def chat(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_local_and_remote_side_by_side(mixed):
    local = chat(mixed, "tiny")
    assert local.status_code == 200 and local.headers["x-selfhost-backend"] == "local/tiny"
    assert local.json()["usage"]["completion_tokens"] <= 4
    remote_answer = chat(mixed, "gpt")
    assert remote_answer.headers["x-selfhost-backend"] == "gpt/0"
    assert set(mixed.app.state.models.names()) == {"tiny"}  # only the local entry loaded; no demo model
    listed = httpx.get(mixed.url + "/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "gpt", "flaky"]
    assert httpx.get(mixed.url + "/v1/models/gpt").json()["owned_by"] == "gateway"
    assert httpx.get(mixed.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(mixed.url + "/v1/models/nope").status_code == 404


PER_TOKEN_USD = Decimal("0.72") / (100 * 3600)


def test_local_answers_are_priced_from_the_cost_model_and_recorded(mixed):
    response = chat(mixed, "tiny")
    usage = response.json()["usage"]
    expected = (usage["prompt_tokens"] + usage["completion_tokens"]) * PER_TOKEN_USD
    assert Decimal(response.headers["x-selfhost-cost-usd"]) == expected
    with httpx.stream("POST", mixed.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and lines[-2].startswith(": x-selfhost-cost-usd=")
    assert all('"choices":[]' not in line.replace(" ", "") for line in lines)  # usage chunk not asked for
    rows = mixed.app.state.gateway.ledger.rows()
    assert [(r["deployment"], r["usage_estimated"]) for r in rows] == [("local/tiny", False)] * 2
    assert Decimal(rows[0]["cost_usd"]) == expected and rows[0]["price_source"].startswith("cost model")
    assert Decimal(lines[-2].split("=", 1)[1]) == Decimal(rows[1]["cost_usd"])


def test_prompt_tokens_from_the_prefix_cache_cost_nothing(mixed):
    """A repeated prompt's cached tokens skipped the prefill, so the local price leaves them out."""
    long = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3
    costs = []
    for _ in range(2):
        response = chat(mixed, "tiny", messages=[{"role": "user", "content": long}])
        usage = response.json()["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        expected = (usage["prompt_tokens"] - cached + usage["completion_tokens"]) * PER_TOKEN_USD
        assert Decimal(response.headers["x-selfhost-cost-usd"]) == expected
        costs.append((cached, expected))
    assert costs[0][0] == 0 and costs[1][0] > 0
    assert mixed.app.state.gateway.ledger.rows()[-1]["cached_input_tokens"] == costs[1][0]


def test_local_answers_on_the_ollama_api_are_priced_and_recorded(mixed):
    """Ollama's final object counts the tokens; a JSON answer carries its cost header, a stream's NDJSON passes
    unchanged and its cost lands in the ledger (and the key's spend) when its `done` line passes."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}}
    answer = httpx.post(mixed.url + "/api/chat", json={**body, "stream": False}, timeout=60)
    assert answer.status_code == 200 and answer.headers["x-selfhost-backend"] == "local/tiny"
    final = answer.json()
    expected = (final["prompt_eval_count"] + final["eval_count"]) * PER_TOKEN_USD
    assert final["eval_count"] >= 1 and Decimal(answer.headers["x-selfhost-cost-usd"]) == expected
    with httpx.stream("POST", mixed.url + "/api/generate", timeout=60,
                      json={"model": "tiny", "prompt": "hi", "options": {"num_predict": 3}}) as r:  # streams
        objects = [json.loads(line) for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert objects[-1]["done"] is True and all(not o["done"] for o in objects[:-1])
    rows = mixed.app.state.gateway.ledger.rows()
    assert [(r["endpoint"], r["deployment"], r["usage_estimated"]) for r in rows] == [
        ("api/chat", "local/tiny", False), ("api/generate", "local/tiny", False)]
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (
        objects[-1]["prompt_eval_count"], objects[-1]["eval_count"])
    assert Decimal(rows[1]["cost_usd"]) == (rows[1]["input_tokens"] + rows[1]["output_tokens"]) * PER_TOKEN_USD


def test_remote_failure_falls_back_to_the_local_model(mixed):
    response = chat(mixed, "flaky")
    assert response.status_code == 200 and response.headers["x-selfhost-backend"] == "local/tiny"
    assert response.json()["model"] == "tiny"
    with httpx.stream("POST", mixed.url + "/v1/chat/completions", timeout=60, json={
            "model": "flaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["x-selfhost-backend"] == "local/tiny"
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    # `curl -d`'s Content-Type: the local route still reads the body as JSON (app.AssumeJSON), on either path.
    form = httpx.post(mixed.url + "/v1/chat/completions", timeout=60,
                      content=json.dumps({"model": "flaky", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 4}),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.headers["x-selfhost-backend"] == "local/tiny"


def test_a_real_selfhost_serve_as_the_upstream(mixed, gateway):
    """One selfhost (serving tiny locally) behind another's gateway, as an OpenAI-compatible remote."""
    front = gateway(f'\n[[models]]\nname = "far-tiny"\nurl = "{mixed.url}/v1"\nmodel = "tiny"\n'
                    'price_model = "gpt-4o-mini"\n')
    answer = chat(front, "far-tiny")
    assert answer.status_code == 200 and answer.headers["x-selfhost-backend"] == "far-tiny/0"
    usage = answer.json()["usage"]
    assert usage["completion_tokens"] <= 4 and Decimal(answer.headers["x-selfhost-cost-usd"]) > 0
    with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=60, json={
            "model": "far-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and lines[-2].startswith(": x-selfhost-cost-usd=")
    streamed_row = front.app.state.gateway.ledger.rows()[-1]  # rows come in time order
    assert streamed_row["usage_estimated"] is False  # the inner server sent its usage chunk when asked
