"""The engine's request check reaches clients as a 400 naming their own field, before any stream starts."""

from __future__ import annotations

import dataclasses

import pytest

from tests.server.conftest import MODEL

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def small_kv(server, monkeypatch):
    """Make the served engine believe its KV cache holds 64 tokens (its blocks stay as they are)."""
    engine = server.app.state.models.models[MODEL].llm.engine
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, kv_capacity_tokens=64))
    return 64


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_kv_cache_is_a_400_on_the_request_field(http, small_kv, stream, field):
    body = {"model": MODEL, "messages": MESSAGES, field: small_kv, "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "context_length_exceeded"
    assert f"max_tokens={small_kv}" in error["message"] and f"holds {small_kv}" in error["message"]


def test_prompt_beyond_the_kv_cache_is_a_400_on_the_prompt(http, small_kv):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * small_kv, "stream": True})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"


def test_default_max_tokens_fills_what_the_kv_cache_leaves(http, small_kv):
    body = {"model": MODEL, "prompt": [5] * (small_kv - 3), "max_tokens": None, "temperature": 0, "ignore_eos": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_out_of_vocabulary_token_names_the_prompt(http):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 10**6], "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "token id 1000000" in error["message"]
