"""Local and remote models side by side: local names keep selfhost's own routes; a local fallback catches
every remote failure."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import refused_url, remote


@pytest.fixture
def mixed(gateway, upstreams, tiny_checkpoint):
    local = f'\n[[models]]\nname = "tiny"\npath = "{tiny_checkpoint("llama")}"\n'
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


def test_remote_failure_falls_back_to_the_local_model(mixed):
    response = chat(mixed, "flaky")
    assert response.status_code == 200 and response.headers["x-selfhost-backend"] == "local/tiny"
    assert response.json()["model"] == "tiny"
    with httpx.stream("POST", mixed.url + "/v1/chat/completions", timeout=60, json={
            "model": "flaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["x-selfhost-backend"] == "local/tiny"
        assert r.read().decode().rstrip().endswith("data: [DONE]")
