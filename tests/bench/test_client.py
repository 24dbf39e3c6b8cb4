"""The streaming client against a real loopback server with injected delays and faults."""

import asyncio
import socket
import time

import pytest

from selfhost.bench.client import EndpointClient, EndpointConfig, EndpointError, detect_backend
from selfhost.bench.dist import parse_length_dist
from selfhost.bench.workload import synthetic_workload
from selfhost.errors import InvalidParameterError

WORKLOAD = synthetic_workload(3, parse_length_dist("fixed:12"), parse_length_dist("fixed:8"), seed=0)


def send(url, model, request=WORKLOAD.requests[0], **config):
    async def go():
        async with EndpointClient(EndpointConfig(url, model, **config)) as client:
            return await client.send(request, time.perf_counter())

    return asyncio.run(go())


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_timings_match_injected_delays(fake, api):
    fake.state.reset(ttft_s=0.15, itl_s=0.03)
    record = send(fake.url, "ok", api=api)
    assert record.ok, record.error_detail
    # Sleeps only ever overshoot; allow generous slack for a shared, busy CPU.
    assert 0.15 <= record.ttft_s < 0.15 + 0.1
    assert 0.03 * 0.9 <= record.tpot_s < 0.03 + 0.015
    assert len(record.itl_s) == 7
    assert sum(record.itl_s) / 7 == pytest.approx(record.tpot_s, rel=0.05)
    assert record.e2e_s == pytest.approx(record.ttft_s + 7 * record.tpot_s)
    assert (record.prompt_tokens, record.output_tokens, record.tokens_source) == (12, 8, "usage")
    body = fake.state.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert ("messages" in body) == (api == "chat")


def test_without_usage_counts_chunks(fake):
    record = send(fake.url, "no-usage")
    assert record.ok
    assert (record.output_tokens, record.prompt_tokens, record.tokens_source) == (8, 12, "chunks")


@pytest.mark.parametrize(
    "model, kind",
    [("http500", "http"), ("broken", "stream"), ("no-done", "stream"), ("slow", "timeout")],
)
def test_failures_become_records(fake, model, kind):
    # Only the slow upstream (5 s before anything) should time out: the others get time to spare on a busy
    # machine (a 0.5 s limit once turned the stream without [DONE] into a timeout under load).
    record = send(fake.url, model, timeout_s=0.5 if kind == "timeout" else 4.0)
    assert record.error == kind
    assert not record.ok and record.error_detail
    if kind == "http":
        assert record.status_code == 500 and "injected failure" in record.error_detail
    if kind == "timeout":
        assert record.e2e_s < 2.0


def test_refused_connection_is_a_connect_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again, so nothing listens here
    record = send(f"http://127.0.0.1:{port}/v1", "ok", timeout_s=2)
    assert record.error == "connect"

    async def probe():
        async with EndpointClient(EndpointConfig(f"http://127.0.0.1:{port}/v1", "ok")) as client:
            await client.list_models()

    with pytest.raises(EndpointError, match=str(port)):
        asyncio.run(probe())


def test_backend_detection(fake):
    async def probe():
        async with EndpointClient(EndpointConfig(fake.url, "ok")) as client:
            return await client.list_models()

    assert detect_backend(asyncio.run(probe())) == "vllm"
    assert detect_backend([{"owned_by": "llamacpp"}]) == "llama.cpp"
    assert detect_backend([{"owned_by": "someone"}]) is None


def test_config_validation_names_the_value():
    with pytest.raises(InvalidParameterError, match="localhost:8000"):
        EndpointConfig("localhost:8000/v1", "m")
    with pytest.raises(InvalidParameterError, match="'embeddings'"):
        EndpointConfig("http://x/v1", "m", api="embeddings")
    headers = EndpointConfig("http://x/v1", "m", api_key="k").headers()
    assert headers == {"Authorization": "Bearer k"}
