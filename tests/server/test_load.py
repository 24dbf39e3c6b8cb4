"""Concurrency, disconnects, metrics and the model registry (load on request, keep-alive, memory budget)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import MODEL


def test_32_parallel_streaming_clients(server):
    async def one(client: openai.AsyncOpenAI, i: int):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i} " * (1 + i % 5)}], max_tokens=16 + i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        return i, text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    tokenizer = server.app.state.models.models[MODEL].llm.tokenizer
    for i, text, usage in results:
        assert usage.completion_tokens == 16 + i
        prompt = [{"role": "user", "content": f"client {i} " * (1 + i % 5)}]
        assert usage.prompt_tokens == len(tokenizer.encode_chat(prompt))
    assert server.wait_idle().kv_blocks_used == 0


def test_disconnect_mid_stream_frees_kv_blocks(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert server.engine_stats().kv_blocks_used > 0
        # leaving the block closes the connection mid-stream
    stats = server.wait_idle()
    assert stats.num_running == 0 and stats.kv_blocks_used == 0


def test_ollama_disconnect_frees_kv_blocks(server):
    body = {"model": MODEL, "prompt": "go on", "options": {"num_predict": 400}}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/api/generate", json=body) as response:
            next(response.iter_lines())
    assert server.wait_idle().kv_blocks_used == 0


def test_metrics_and_stats(http):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "To be", "max_tokens": 3, "ignore_eos": True})
    text = http.get("/metrics").text
    for name in ("selfhost_http_requests_total", "selfhost_prompt_tokens_total", "selfhost_generation_tokens_total",
                 "selfhost_time_to_first_token_seconds_bucket", "selfhost_time_per_output_token_seconds_bucket",
                 "selfhost_num_requests_waiting", "selfhost_kv_blocks_used", "selfhost_prefix_cache_hit_rate"):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text
    # The precision the server chose on this CPU (weight_dtype defaults to "auto"), as an info gauge.
    precision = next(line for line in text.splitlines() if line.startswith("selfhost_precision_info{"))
    weights = "bfloat16" if 'weights="bfloat16"' in precision else "float32"
    assert f'weights="{weights}"' in precision and f'kv_cache="{weights}"' in precision
    assert 'kernels="' in precision and precision.endswith(" 1.0")
    stats = http.get("/stats").json()
    assert stats["models"][MODEL]["kv_blocks_total"] > 0 and "tokens_per_s" in stats
    assert http.get("/health").json() == {"status": "ok", "models": [MODEL]}


def test_access_log_is_structured(http, caplog):
    def models_entries():
        # Not simply the last record: a stream an earlier test dropped may log its own line late.
        entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "selfhost.access"]
        return [e for e in entries if e["path"] == "/v1/models"]

    with caplog.at_level("INFO", logger="selfhost.access"):
        http.get("/v1/models")
        # The server writes the line once the response is sent, which can be after the
        # client has it: wait for it (the server runs in another thread).
        deadline = time.monotonic() + 5
        while not models_entries() and time.monotonic() < deadline:
            time.sleep(0.01)
    entry = models_entries()[-1]
    assert entry["status"] == 200 and entry["duration_ms"] >= 0 and entry["method"] == "GET"


@pytest.fixture
def allow_load(server):
    server.settings.allow_load = True
    yield server
    server.settings.allow_load = False
    server.settings.memory_budget = None


def test_load_on_request_then_keep_alive_unload(allow_load, http, tiny_checkpoint):
    ref = str(tiny_checkpoint("qwen2"))
    r = http.post("/v1/completions", json={"model": ref, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert ref in http.get("/api/ps").text and ref in [m["id"] for m in http.get("/v1/models").json()["data"]]
    deadline = time.monotonic() + 15  # keep_alive_s=1 in the fixture server
    while ref in allow_load.app.state.models.models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ref not in allow_load.app.state.models.models
    assert MODEL in allow_load.app.state.models.models  # preloaded models stay


def test_over_budget_load_is_a_clear_error(allow_load, http, tiny_checkpoint):
    allow_load.settings.memory_budget = "1KiB"
    r = http.post("/v1/completions", json={"model": str(tiny_checkpoint("qwen2")), "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 507
    assert "memory budget" in r.json()["error"]["message"] and r.json()["error"]["code"] == "memory_budget_exceeded"
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_unloadable_reference_is_404(allow_load, http):
    r = http.post("/v1/completions", json={"model": "/no/such/folder", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
