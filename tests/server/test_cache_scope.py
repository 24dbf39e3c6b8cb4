"""`--prefix-cache-scope key`: one API key's requests cannot reuse (or probe) another key's cached prefixes."""

from __future__ import annotations

import pytest

from tests.server.conftest import MODEL

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 3


@pytest.fixture
def keyed_scope(server):
    server.settings.api_key = ["key-a", "key-b"]
    server.app.state.serving.prefix_cache_scope = "key"
    yield
    server.settings.api_key = []
    server.app.state.serving.prefix_cache_scope = "global"


def _hit_tokens(server, http, key: str) -> int:
    manager = server.app.state.models.models[MODEL].llm.engine.block_manager
    before = manager.prefix_hit_tokens
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1},
                         headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return manager.prefix_hit_tokens - before


def test_prefix_cache_is_scoped_per_key(server, http, keyed_scope):
    _hit_tokens(server, http, "key-a")
    assert _hit_tokens(server, http, "key-b") == 0
    assert _hit_tokens(server, http, "key-a") > 0


def test_usage_counts_the_prompt_tokens_read_from_the_prefix_cache(server, http, openai_client):
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`: 0 for a prompt the cache has not seen, then the
    engine's own count of the blocks it reused (whole blocks, never the whole prompt), whole or streamed."""
    prompt = "Whose woods these are I think I know; his house is in the village though. " * 3
    manager = server.app.state.models.models[MODEL].llm.engine.block_manager
    first = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    hits = manager.prefix_hit_tokens
    again = openai_client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": prompt}])  # a different prompt (the chat template): its own count
    assert again.usage.prompt_tokens_details.cached_tokens == manager.prefix_hit_tokens - hits
    hits = manager.prefix_hit_tokens
    second = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).json()["usage"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached == manager.prefix_hit_tokens - hits and 0 < cached < second["prompt_tokens"] and cached % 16 == 0
    stream = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True,
                                              stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == cached
