"""The lean entrance answers every request as FastAPI's full stack does, and takes the short path only when it may.

(Every test using the `gateway` fixture also runs through the entrance; here the two paths
answer the same requests side by side.)
"""

from __future__ import annotations

import textwrap
from decimal import Decimal

import httpx
import pytest

from selfhost.server.guards import ApiKeyAuth
from selfhost.server.settings import ServerSettings
from tests.gateway.conftest import remote, set_entrance
from tests.server.conftest import LoopbackServer

OPERATOR_KEY = "sk-operator-1"
CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
# Response headers a client or operator reads; the rest (date, server) differ run to run anyway.
HEADERS_THAT_MATTER = ("content-type", "x-selfhost-backend", "x-selfhost-cost-usd", "connection", "cache-control")
# Ledger columns that differ between two servers by construction.
PER_RUN_COLUMNS = ("request_id", "time")


def _server(tmp_path, name: str, upstream_url: str, entrance: bool) -> LoopbackServer:
    folder = tmp_path / name
    folder.mkdir()
    config = folder / "selfhost.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{folder / "ledger.db"}"\ntimeout_s = 2\nbackoff_s = 0\n'
                      + textwrap.dedent(remote("gpt", upstream_url) + remote("other", upstream_url)))
    settings = ServerSettings(config=config, responses_db=folder / "r.db", api_key=[OPERATOR_KEY],
                              max_body_bytes="2KiB")
    return set_entrance(LoopbackServer(settings), entrance).start()


@pytest.fixture
def pair(tmp_path, upstreams):
    servers = [_server(tmp_path, "full", upstreams[0].url, False), _server(tmp_path, "lean", upstreams[0].url, True)]
    yield servers
    for server in servers:
        server.stop()


def _requests(virtual_keys: dict) -> list[tuple[str, str, dict, bytes]]:
    """(label, path, headers, body) for each case, ordinary and not."""
    op = {"Authorization": f"Bearer {OPERATOR_KEY}", "Content-Type": "application/json"}
    import json

    def body(payload) -> bytes:
        return json.dumps(payload).encode()

    return [
        ("chat", "/v1/chat/completions", op, body(CHAT)),
        ("chat via x-api-key", "/v1/chat/completions", {"x-api-key": OPERATOR_KEY}, body(CHAT)),
        ("chat sent as a form", "/v1/chat/completions",
         {**op, "Content-Type": "application/x-www-form-urlencoded"}, body(CHAT)),
        ("stream", "/v1/chat/completions", op, body({**CHAT, "stream": True})),
        ("stream with usage", "/v1/chat/completions", op,
         body({**CHAT, "stream": True, "stream_options": {"include_usage": True}})),
        ("completions", "/v1/completions", op, body({"model": "gpt", "prompt": "hi"})),
        ("embeddings", "/v1/embeddings", op, body({"model": "gpt", "input": "hi"})),
        ("ollama chat", "/api/chat", op, body({**CHAT, "stream": False})),
        ("wrong operator key", "/v1/chat/completions", {"Authorization": "Bearer sk-wrong"}, body(CHAT)),
        ("no key", "/v1/chat/completions", {}, body(CHAT)),
        ("other scheme, right x-api-key", "/v1/chat/completions",
         {"Authorization": "Basic eDp5", "x-api-key": OPERATOR_KEY}, body(CHAT)),
        ("bearer wrong, right x-api-key", "/v1/chat/completions",
         {"Authorization": "Bearer sk-wrong", "x-api-key": OPERATOR_KEY}, body(CHAT)),
        ("body over the limit", "/v1/chat/completions", op,
         body({**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]})),
        ("malformed JSON", "/v1/chat/completions", op, b'{"model": "gpt", '),
        ("model not a string", "/v1/chat/completions", op, body({**CHAT, "model": 7})),
        ("unknown model", "/v1/chat/completions", op, body({**CHAT, "model": "nowhere"})),
        ("virtual key", "/v1/chat/completions", {"Authorization": f"Bearer {virtual_keys['rich']}"}, body(CHAT)),
        ("virtual key over budget", "/v1/chat/completions", {"Authorization": f"Bearer {virtual_keys['poor']}"},
         body(CHAT)),
        ("virtual key, model not allowed", "/v1/chat/completions",
         {"Authorization": f"Bearer {virtual_keys['rich']}"}, body({**CHAT, "model": "other"})),
        ("unknown virtual key", "/v1/chat/completions", {"Authorization": "Bearer sk-selfhost-nope"}, body(CHAT)),
    ]


def _answer(server, path, headers, body) -> tuple:
    response = httpx.post(server.url + path, content=body, headers=headers, timeout=10)
    kept = {name: response.headers.get(name) for name in HEADERS_THAT_MATTER}
    content = response.content
    if response.headers.get("content-type", "").startswith("application/json"):
        content = response.json()
        if isinstance(content, dict):  # these differ per request by design
            for field in ("id", "created", "created_at"):
                content.pop(field, None)
    elif b"data:" in content:  # a stream: its events, the cost comment included
        content = [line for line in content.split(b"\n") if line]
    return response.status_code, kept, content


def test_both_paths_answer_alike_and_write_the_same_ledger(pair, upstreams):
    full, lean = pair
    keys = []
    for server in pair:  # the same keys' text cannot be chosen: each server gets its own, used alike
        store = server.app.state.gateway.keys
        keys.append({"rich": store.create("rich", budget_usd=Decimal("5"), models=["gpt"]),
                     "poor": store.create("poor", budget_usd=Decimal("0.0000001"))})
    for case_full, case_lean in zip(_requests(keys[0]), _requests(keys[1]), strict=True):
        label = case_full[0]
        assert _answer(full, *case_full[1:]) == _answer(lean, *case_lean[1:]), label
    upstreams[0].mode = "500"  # every attempt fails before its first byte: the API's 502 error object
    failing = ("/v1/chat/completions", {"Authorization": f"Bearer {OPERATOR_KEY}"}, b'{"model": "gpt"}')
    assert _answer(full, *failing) == _answer(lean, *failing)
    assert _answer(full, *failing)[0] == 502

    def ledger(server):
        return [{k: v for k, v in row.items() if k not in PER_RUN_COLUMNS}
                for row in server.app.state.gateway.ledger.rows()]

    assert ledger(full) == ledger(lean)
    assert len(ledger(lean)) == 10  # nine proxied answers with the operator's key, one with a virtual key


def test_only_the_ordinary_case_skips_the_stack(pair, monkeypatch):
    _, lean = pair
    inner_calls = []
    original = ApiKeyAuth.__call__

    async def counting(self, scope, receive, send):
        inner_calls.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(ApiKeyAuth, "__call__", counting)
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert httpx.post(lean.url + "/v1/chat/completions", json=CHAT, headers=op).status_code == 200
    assert inner_calls == []  # proxied without the middleware stack
    assert httpx.post(lean.url + "/v1/chat/completions", json=CHAT, headers={}).status_code == 401
    assert httpx.post(lean.url + "/v1/chat/completions", json={**CHAT, "model": "nowhere"},
                      headers=op).status_code == 404
    assert httpx.get(lean.url + "/v1/models", headers=op).status_code == 200
    assert inner_calls == ["/v1/chat/completions", "/v1/chat/completions", "/v1/models"]


def test_proxied_requests_still_count_and_log(pair, caplog):
    _, lean = pair
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    with caplog.at_level("INFO", logger="selfhost.access"):
        assert httpx.post(lean.url + "/v1/chat/completions", json=CHAT, headers=op).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "selfhost.access"]
    assert len(lines) == 1 and '"path": "/v1/chat/completions"' in lines[0] and '"status": 200' in lines[0]
    metrics = httpx.get(lean.url + "/metrics", headers=op).text
    assert 'selfhost_http_requests_total{method="POST",route="unmatched",status="200"} 1.0' in metrics
