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
