"""Soak (issue 25): 64 clients stream chat and completions for SELFHOST_SOAK_S seconds (default 300),
a fifth of them hanging up mid-stream, some asking without streaming. Afterwards the engine is
idle with every KV block free, no request got a 5xx or a failed stream, and this process's RSS
(the server runs in it) grew by a bounded amount after warm-up.

    SELFHOST_SOAK_S=300 pytest -m slow tests/server/test_soak.py -s
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.server.conftest import MODEL

CLIENTS = 64
DISCONNECTING_SHARE = 0.2
NON_STREAMED_SHARE = 0.15
RSS_GROWTH_LIMIT_MB = 200


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    disconnected: int = 0
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # 5xx, error events, exceptions

    def ok(self, latency_s: float) -> None:
        with self.lock:
            self.done += 1
            self.latencies_s.append(latency_s)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def request(rng: random.Random) -> tuple[str, dict]:
    max_tokens = rng.randint(4, 48)
    if rng.random() < 0.5:
        words = " ".join(rng.choice(["sun", "rain", "tea", "code", "sea"]) for _ in range(rng.randint(1, 30)))
        return "/v1/chat/completions", {"model": MODEL, "max_tokens": max_tokens, "seed": rng.randint(0, 9),
                                        "messages": [{"role": "user", "content": words}]}
    prompt = "Once upon a time " * rng.randint(1, 12)
    return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                               "temperature": rng.choice([0.0, 0.8])}


def run_client(url: str, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(index)
    disconnects = index < CLIENTS * DISCONNECTING_SHARE
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            path, body = request(rng)
            start = time.perf_counter()
            try:
                if rng.random() < NON_STREAMED_SHARE:
                    response = client.post(path, json=body)
                    if response.status_code >= 500 or "choices" not in response.json():
                        tally.fail(f"{path} {response.status_code} {response.text[:200]}")
                        continue
                    tally.ok(time.perf_counter() - start)
                    continue
                with client.stream("POST", path, json={**body, "stream": True}) as response:
                    if response.status_code != 200:
                        tally.fail(f"{path} stream {response.status_code} {response.read()[:200]!r}")
                        continue
                    events, hang_up_after = [], rng.randint(1, 3) if disconnects else None
                    for line in response.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        events.append(line[6:])
                        if hang_up_after is not None and len(events) >= hang_up_after:
                            break  # leaving the block closes the connection mid-stream
                    if hang_up_after is not None and events[-1] != "[DONE]":
                        with tally.lock:
                            tally.disconnected += 1
                        continue
                    if events[-1] != "[DONE]" or any('"error"' in e for e in events[:-1]):
                        tally.fail(f"{path} stream ended badly: {events[-2:]}")
                        continue
                    json.loads(events[-2])  # the last chunk is whole JSON
                    tally.ok(time.perf_counter() - start)
            except httpx.HTTPError as err:
                tally.fail(f"{path} {type(err).__name__}: {err}")


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@pytest.mark.slow
def test_soak_streaming_clients(server):
    duration_s = float(os.environ.get("SELFHOST_SOAK_S", "300"))
    warmup_s = min(60.0, duration_s / 5)
    tally = Tally()
    rss_start = rss_mb()
    start = time.monotonic()
    deadline = start + duration_s
    threads = [threading.Thread(target=run_client, args=(server.url, i, deadline, tally), daemon=True)
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    rss_warm = rss_mb()
    rss_peak = rss_warm
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0)))
        rss_peak = max(rss_peak, rss_mb())
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "clients still running 5 minutes after the deadline"
    engine = server.app.state.models.models[MODEL].engine
    assert engine._worker.is_alive(), "the engine thread died (see the thread exception above)"
    stats = server.wait_idle(timeout_s=60)
    rss_end = rss_mb()

    latencies = sorted(tally.latencies_s)
    print(f"\nsoak: {CLIENTS} clients for {duration_s:.0f} s (warm-up {warmup_s:.0f} s): {tally.done} requests done, "
          f"{tally.disconnected} hung up mid-stream, {len(tally.failures)} errors; "
          f"latency p50 {percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s; "
          f"RSS start {rss_start:.0f} MB, after warm-up {rss_warm:.0f} MB, peak {rss_peak:.0f} MB, "
          f"end {rss_end:.0f} MB (growth after warm-up {rss_end - rss_warm:+.1f} MB); "
          f"engine running {stats.num_running}, waiting {stats.num_waiting}, "
          f"KV blocks used {stats.kv_blocks_used}/{stats.kv_blocks_total}")
    assert not tally.failures, tally.failures[:10]
    assert tally.done > CLIENTS and tally.disconnected > 0
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
    assert server.app.state.models.models[MODEL].active == 0
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_MB
