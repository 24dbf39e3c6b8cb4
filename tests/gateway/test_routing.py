"""Routing, balancing, fallback order and the x-selfhost-backend header, against fake upstreams."""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway.conftest import refused_url, remote

CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


def post(server, body=CHAT, path="/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=10)


def test_remote_model_is_proxied_with_the_upstream_id_and_key(gateway, upstreams):
    a = upstreams[0]
    server = gateway(remote("gpt", a.url, deployment="openai-east"))
    response = post(server)
    assert response.status_code == 200
    assert response.headers["x-selfhost-backend"] == "openai-east"
    assert response.json()["choices"][0]["message"]["content"] == "Hello from upstream a"
    headers, body = a.received[0]
    assert body["model"] == "gpt-4o-mini"  # the upstream's id, not the public name
    assert headers["authorization"] == "Bearer sk-upstream-SECRET-4242"


def test_least_outstanding_spreads_concurrent_requests(gateway, upstreams):
    a, b = upstreams[0], upstreams[1]
    a.mode = b.mode = "slow"
    server = gateway(remote("gpt", a.url) + remote("gpt", b.url), timeout_s=10.0)
    with ThreadPoolExecutor(4) as pool:
        backends = [r.headers["x-selfhost-backend"] for r in pool.map(lambda _: post(server), range(4))]
    assert sorted(backends) == ["gpt/0", "gpt/0", "gpt/1", "gpt/1"]


def test_sequential_requests_alternate_between_equal_deployments(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url) + remote("gpt", upstreams[1].url))
    assert [post(server).headers["x-selfhost-backend"] for _ in range(4)] == ["gpt/0", "gpt/1", "gpt/0", "gpt/1"]


def test_weight_shifts_the_share(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url, weight=3.0) + remote("gpt", upstreams[1].url))
    backends = [post(server).headers["x-selfhost-backend"] for _ in range(8)]
    assert backends.count("gpt/0") == 6


def test_max_concurrency_full_everywhere_is_a_clear_502(gateway, upstreams):
    a = upstreams[0]
    a.mode = "slow"
    server = gateway(remote("gpt", a.url, max_concurrency=1), timeout_s=10.0)
    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: post(server), range(2)))
    assert statuses == [200, 502]


def test_failures_before_the_first_byte_go_to_the_next_deployment_then_fallbacks(gateway, upstreams):
    a, b, c = upstreams
    a.mode, b.mode = "500", "429"
    server = gateway(remote("gpt", a.url, fallbacks=["spare"]) + remote("gpt", b.url) + remote("spare", c.url)
                     + f'\n[[models]]\nname = "other"\nurl = "{refused_url()}"\nmodel = "m"\n')
    response = post(server)
    assert response.status_code == 200
    assert response.headers["x-selfhost-backend"] == "spare/0"
    assert len(a.received) == len(b.received) == len(c.received) == 1


def test_cooling_deployment_is_tried_after_healthy_ones(gateway, upstreams):
    a, b = upstreams[0], upstreams[1]
    a.mode = "500"
    server = gateway(remote("gpt", a.url) + remote("gpt", b.url))
    assert post(server).headers["x-selfhost-backend"] == "gpt/1"
    a.mode = "ok"
    # gpt/0 cools down (30 s by default), so the healthy gpt/1 answers every request meanwhile.
    assert {post(server).headers["x-selfhost-backend"] for _ in range(3)} == {"gpt/1"}
    assert len(a.received) == 1


def test_health_checks_cool_a_failing_deployment_and_bring_it_back(gateway, upstreams):
    a, b = upstreams[0], upstreams[1]
    server = gateway("health_check_interval_s = 0.1\n" + remote("gpt", a.url) + remote("gpt", b.url))
    deployment = server.app.state.gateway.table.deployments["gpt"][0]
    a.mode = "500"
    _wait_until(lambda: deployment.failures > 0)
    assert {post(server).headers["x-selfhost-backend"] for _ in range(3)} == {"gpt/1"}  # no client hit gpt/0
    assert all("messages" not in body for _, body in a.received)
    a.mode = "ok"
    _wait_until(lambda: deployment.failures == 0)  # back before its 30 s cooldown ends
    # Level with gpt/1 again (not owed the 3 requests it missed): the two take turns.
    assert sorted(post(server).headers["x-selfhost-backend"] for _ in range(4)) == ["gpt/0", "gpt/0", "gpt/1", "gpt/1"]


def _wait_until(condition, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_cheapest_router_prefers_price_while_latency_meets_the_objective(gateway, upstreams):
    cheap, dear = upstreams[0], upstreams[1]
    # 200 ms: between an ordinary answer (a few ms; under 200 even on a loaded CI machine, where 100 once
    # failed) and a slow one (SLOW_S = 300 ms at least: a sleep never undershoots).
    server = gateway('router = "cheapest"\nlatency_objective_ms = 200\n'
                     + remote("gpt", dear.url, model="gpt-4o", deployment="dear")
                     + remote("gpt", cheap.url, model="gpt-4o-mini", deployment="cheap"))
    assert [post(server).headers["x-selfhost-backend"] for _ in range(3)] == ["cheap"] * 3
    cheap.mode = "slow"  # 300 ms: its median passes the objective once about half its recent requests were slow
    backends = [post(server).headers["x-selfhost-backend"] for _ in range(8)]
    switch = backends.index("dear")
    assert 2 <= switch <= 4 and backends == ["cheap"] * switch + ["dear"] * (8 - switch)
    # Measurements age out: once they are older than LATENCY_MAX_AGE_S, the cheap one is tried again.
    cheap_deployment = server.app.state.gateway.table.deployments["gpt"][1]
    cheap_deployment.latencies_s = deque((when - 61, s) for when, s in cheap_deployment.latencies_s)
    cheap.mode = "ok"
    assert post(server).headers["x-selfhost-backend"] == "cheap"


def test_refused_and_hanging_upstreams_fall_through(gateway, upstreams):
    a, b = upstreams[0], upstreams[1]
    a.mode = "hang"
    server = gateway(remote("gpt", refused_url()) + remote("gpt", a.url) + remote("gpt", b.url))
    response = post(server)
    assert response.status_code == 200 and response.headers["x-selfhost-backend"] == "gpt/2"


def test_every_deployment_failing_is_a_502_naming_each(gateway, upstreams):
    upstreams[0].mode = "500"
    server = gateway(remote("gpt", upstreams[0].url) + remote("gpt", refused_url()))
    response = post(server)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "gpt/0: HTTP 500" in error["message"] and "gpt/1: ConnectError" in error["message"]


def test_upstream_client_errors_pass_through_without_retry(gateway, upstreams):
    a = upstreams[0]
    server = gateway(remote("gpt", a.url) + remote("gpt", upstreams[1].url))
    response = post(server, {"model": "gpt"})  # no messages: the upstream answers 400
    assert response.status_code == 400 and response.json()["error"]["message"] == "messages or prompt required"
    assert response.headers["x-selfhost-backend"] == "gpt/0"
    assert len(a.received) + len(upstreams[1].received) == 1  # a client error is not retried elsewhere


def test_rejected_gateway_credentials_are_a_502_not_the_clients_401(gateway, upstreams):
    upstreams[0].mode = "401"
    server = gateway(remote("gpt", upstreams[0].url))
    response = post(server)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_auth_failed"


def test_streaming_relays_chunks_and_hides_the_usage_chunk_unless_asked(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.headers["x-selfhost-backend"] == "gpt/0"
        lines = [line for line in response.iter_lines() if line]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in data) == "Hello from upstream"
    assert all(c["choices"] for c in data)  # the usage chunk was the gateway's, not asked for
    assert lines[-1] == "data: [DONE]"
    assert any(line.startswith(": x-selfhost-cost-usd=") for line in lines)
    assert upstreams[0].received[0][1]["stream_options"] == {"include_usage": True}


def test_streaming_fails_over_before_the_first_byte(gateway, upstreams):
    upstreams[0].mode = "500"
    server = gateway(remote("gpt", upstreams[0].url) + remote("gpt", upstreams[1].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["x-selfhost-backend"] == "gpt/1"
        assert "Hello" in response.read().decode()


def test_no_fallback_after_the_first_byte(gateway, upstreams):
    a, b = upstreams[0], upstreams[1]
    a.mode = "drop"
    server = gateway(remote("gpt", a.url, fallbacks=["spare"]) + remote("spare", b.url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["x-selfhost-backend"] == "gpt/0"
        lines = [line for line in response.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["Hello", " from"]
    assert events[-1]["error"]["code"] == "upstream_interrupted"
    assert lines[-1] == "data: [DONE]"
    assert b.received == []  # never retried elsewhere once the client had bytes


def test_a_stream_that_stalls_after_its_first_byte_ends_with_an_error_event(gateway, upstreams):
    upstreams[0].mode = "stall"
    server = gateway(remote("gpt", upstreams[0].url) + remote("gpt", upstreams[1].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        text = response.read().decode()
    assert '"Hello"' in text and "upstream_interrupted" in text and "ReadTimeout" in text
    assert upstreams[1].received == []


def test_a_client_that_leaves_mid_stream_is_recorded_and_frees_its_slot(gateway, upstreams):
    upstreams[0].mode = "stall"
    server = gateway(remote("gpt", upstreams[0].url))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        next(response.iter_lines())  # the first chunk, then hang up
    deployment = server.app.state.gateway.table.all()[0]
    deadline = time.monotonic() + 5
    while not server.app.state.gateway.ledger.rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = server.app.state.gateway.ledger.rows()
    assert row["status"] == "client_disconnected" and row["output_tokens"] == 1
    assert deployment.outstanding == 0


def test_completions_and_embeddings_are_proxied(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url) + remote("embed", upstreams[1].url, model="text-embedding-3-small"))
    completion = post(server, {"model": "gpt", "prompt": "hi"}, "/v1/completions")
    assert completion.status_code == 200 and completion.headers["x-selfhost-backend"] == "gpt/0"
    embedding = post(server, {"model": "embed", "input": "hi"}, "/v1/embeddings")
    assert embedding.status_code == 200 and embedding.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    assert embedding.headers["x-selfhost-backend"] == "embed/0"


def test_unknown_model_still_goes_to_the_local_routes(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    response = post(server, {**CHAT, "model": "nope"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert response.headers["x-selfhost-backend"] == "local/nope"
    malformed = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
