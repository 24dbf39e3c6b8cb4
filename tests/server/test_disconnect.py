"""A client that hangs up on a non-streamed request aborts it: the batch empties and its KV blocks come back."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.server.conftest import MODEL

STEP_DELAY_S = 0.02  # slows every engine step, so the full generation would take MAX_TOKENS * 20 ms = 8 s
MAX_TOKENS = 400

ROUTES = {
    "completions": ("/v1/completions", {"prompt": "To be", "max_tokens": MAX_TOKENS, "ignore_eos": True}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "To be"}],
                                      "max_tokens": MAX_TOKENS, "ignore_eos": True}),
    "ollama-generate": ("/api/generate", {"prompt": "To be", "stream": False, "raw": True,
                                          "options": {"num_predict": MAX_TOKENS}}),
    "ollama-chat": ("/api/chat", {"messages": [{"role": "user", "content": "To be"}], "stream": False,
                                  "options": {"num_predict": MAX_TOKENS}}),
}


@pytest.fixture
def slow_engine(server, monkeypatch):
    """The served engine, each step delayed: a long generation without a long test."""
    engine = server.app.state.models.models[MODEL].engine.engine
    run = engine.runner.run

    def slow_run(chunks):
        time.sleep(STEP_DELAY_S)
        return run(chunks)

    monkeypatch.setattr(engine.runner, "run", slow_run)
    return engine


def model_stats(http) -> dict:
    return http.get("/stats").json()["models"][MODEL]


def requests_with_status(http, path: str, status: int) -> float:
    prefix = f'selfhost_http_requests_total{{method="POST",route="{path}",status="{status}"}} '
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def post_and_hang_up(server, http, path: str, body: dict) -> None:
    """Send the request on a raw socket, wait until the engine runs it, then close the connection."""
    host, port = server.sock.getsockname()
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + 30
        while model_stats(http)["running"] == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_hang_up_aborts_a_whole_response(route, server, http, slow_engine):
    path, body = ROUTES[route]
    steps_before = model_stats(http)["steps"]
    closed_before = requests_with_status(http, path, 499)
    post_and_hang_up(server, http, path, {"model": MODEL, **body})
    hung_up = time.monotonic()
    deadline = hung_up + MAX_TOKENS * STEP_DELAY_S / 2
    while (stats := model_stats(http))["running"] or stats["waiting"] or stats["active_requests"]:
        assert time.monotonic() < deadline, f"still generating {time.monotonic() - hung_up:.1f}s after the hang-up"
        time.sleep(0.02)
    assert stats["kv_blocks_used"] == 0
    steps = stats["steps"] - steps_before
    assert 0 < steps < MAX_TOKENS / 2, f"{steps} engine steps ran for a request that was abandoned early"
    # The access log counts the abandoned request as nginx does, 499 "client closed request".
    while requests_with_status(http, path, 499) == closed_before:
        assert time.monotonic() < deadline, "the abandoned request was not counted with status 499"
        time.sleep(0.02)
