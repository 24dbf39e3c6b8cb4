"""Scale-out: one vs two selfhost replicas on Ray Serve (one core each), same run, plus prefix routing.

    flock /tmp/bench.lock python benchmarks/scale_out.py [--requests 96] [--rate 40]

Throughput workload: --requests prompts of 64-192 random tokens, 64 new tokens each (eos
ignored), Poisson arrivals at --rate/s (chosen to saturate one replica), streamed through
selfhost's OpenAI API on Serve's proxy; the benchmark model of scale_sim.py (~14M random
Llama). Printed per run: requests/s, output tokens/s, TTFT p50/p99, and the simulator's
prediction for the same arrivals from the step model it measures first (1 thread).
Prefix workload: 8 system prompts of 384 tokens, each followed by a distinct 32-token
question, at --shared-rate/s, on two replicas whose KV caches each hold about half of the
system prompts, with prefix-aware routing and with round-robin: cluster-wide prefix hit rate
(engine counters) and TTFT.
Targets: 2 replicas >= 1.7x one's throughput; prefix routing's hit rate >= 2x round-robin's
with TTFT p50 at least 30% lower; the simulator within 20% of both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.scale_sim import SCALE_LLAMA, build_model, measure, simulate, summarize  # noqa: E402

OUTPUT_TOKENS = 64
PREFIX_KV_CACHE = "16MiB"  # ~2,700 tokens of this model: about 4 of the 8 system prompts beside the running requests


def _prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, SCALE_LLAMA["vocab_size"]) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], at: float, t0: float) -> tuple:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    sent = time.perf_counter()
    first = None
    body = {"model": "bench", "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "stream": True,
            "temperature": 0}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter()
    return sent, first, time.perf_counter()


async def _drive(url: str, prompts: list[list[int]], arrivals: list[float]) -> dict:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        times = await asyncio.gather(*(_one(client, url, p, a, t0) for p, a in zip(prompts, arrivals)))
    return summarize(times, OUTPUT_TOKENS)


def _hit_rate(app_name: str, before: dict) -> float:
    from ray import serve

    board = serve.get_deployment_handle("StatsBoard", app_name).snapshot.remote().result()
    hit = sum(s["prefix_hit_tokens"] - before.get(r, (0, 0))[0] for r, s in board.items())
    queried = sum(s["prefix_queried_tokens"] - before.get(r, (0, 0))[1] for r, s in board.items())
    return hit / queried if queried else 0.0


def _board(app_name: str) -> dict:
    from ray import serve

    board = serve.get_deployment_handle("StatsBoard", app_name).snapshot.remote().result()
    return {r: (s["prefix_hit_tokens"], s["prefix_queried_tokens"]) for r, s in board.items()}


def _deploy(model_dir: Path, replicas: int, routing: str, port: int, kv_cache: str = "512MiB"):
    from ray import serve

    from selfhost.cluster.app import build_app
    from selfhost.cluster.config import ClusterConfig
    from selfhost.cluster.launch import app_args
    from selfhost.server.settings import ServerSettings

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cluster = ClusterConfig(replicas=replicas, routing=routing, app_name=f"bench{replicas}{routing}")
    settings = ServerSettings(models=[f"bench={model_dir}"], weight_dtype="float32", kv_cache_memory=kv_cache,
                              log_level="warning")
    serve.run(build_app(app_args(settings, cluster)), name=cluster.app_name, route_prefix="/")
    time.sleep(3)  # the replicas' first stats reports
    return cluster.app_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--shared-rate", type=float, default=4.0, help="Requests/s of the shared-prompt workload.")
    args = parser.parse_args()
    import ray
    from ray import serve

    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                   platform.processor())
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {cpu} | {os.cpu_count()} CPUs | load {os.getloadavg()}")
    model_dir = build_model(Path("/tmp/selfhost-scale-llama"))
    step = measure(model_dir)
    print(f"step model (1 thread): {step.base_s * 1e3:.2f} ms + {step.decode_s * 1e3:.3f} ms/decode row + "
          f"{step.prefill_s * 1e3:.4f} ms/prompt token")
    rng = random.Random(1)
    arrivals, now = [], 0.0
    for _ in range(args.requests):
        now += rng.expovariate(args.rate)
        arrivals.append(now)
    prompts = _prompts(args.requests, 64, 192, seed=2)
    mean_prompt = round(sum(map(len, prompts)) / len(prompts))

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    results = {}
    try:
        for replicas in (1, 2):
            app = _deploy(model_dir, replicas, "prefix", args.port)
            real = asyncio.run(_drive(f"http://127.0.0.1:{args.port}", prompts, arrivals))
            predicted = simulate(step, replicas, args.rate, args.requests, mean_prompt, OUTPUT_TOKENS,
                                 arrivals=arrivals)
            results[replicas] = real
            print(f"{replicas} replica(s): {real['requests_per_s']:.2f} req/s, {real['output_tok_s']:.0f} output "
                  f"tok/s, TTFT p50 {real['ttft_p50_s'] * 1e3:.0f} ms, p99 {real['ttft_p99_s'] * 1e3:.0f} ms | "
                  f"simulated {predicted['output_tok_s']:.0f} tok/s "
                  f"({predicted['output_tok_s'] / real['output_tok_s'] - 1:+.0%}), TTFT p50 "
                  f"{predicted['ttft_p50_s'] * 1e3:.0f} ms")
            if replicas == 1:
                serve.delete(app)
                continue
            # Prefix workload: two replicas whose KV caches (PREFIX_KV_CACHE) each hold about half the system
            # prompts, as when a fleet serves more prompts than one replica can keep; below saturation
            # (--shared-rate), so TTFT shows prefill work rather than queueing.
            for routing in ("prefix", "round_robin"):
                serve.delete(app)
                app = _deploy(model_dir, 2, routing, args.port, PREFIX_KV_CACHE)
                systems = _prompts(8, 384, 384, seed=3)
                questions = _prompts(64, 32, 32, seed=4 if routing == "prefix" else 5)
                # Each request's system prompt drawn at random (a cyclic order would line up with round-robin).
                pick = random.Random(6)
                shared = [systems[pick.randrange(8)] + q for q in questions]
                before = _board(app)
                real = asyncio.run(_drive(f"http://127.0.0.1:{args.port}", shared,
                                          [i / args.shared_rate for i in range(len(shared))]))
                time.sleep(2.5)  # one more stats report
                hit = _hit_rate(app, before)
                results[routing] = {**real, "hit_rate": hit}
                print(f"shared prompts, {routing}: prefix hit rate {hit:.1%}, TTFT p50 "
                      f"{real['ttft_p50_s'] * 1e3:.0f} ms, p99 {real['ttft_p99_s'] * 1e3:.0f} ms, "
                      f"{real['output_tok_s']:.0f} output tok/s")
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    speedup = results[2]["output_tok_s"] / results[1]["output_tok_s"]
    hit_ratio = results["prefix"]["hit_rate"] / max(results["round_robin"]["hit_rate"], 1e-9)
    ttft_cut = 1 - results["prefix"]["ttft_p50_s"] / results["round_robin"]["ttft_p50_s"]
    print(json.dumps({"speedup_2_vs_1": round(speedup, 2), "hit_rate_ratio": round(hit_ratio, 2),
                      "ttft_p50_reduction": round(ttft_cut, 2)}))
    print(f"targets: speedup >= 1.7: {speedup >= 1.7}; hit rate >= 2x: {hit_ratio >= 2}; "
          f"TTFT p50 >= 30% lower: {ttft_cut >= 0.3}")


if __name__ == "__main__":
    main()
