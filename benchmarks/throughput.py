"""Offline throughput: selfhost's batching engine vs transformers, same weights, same run.

    python benchmarks/throughput.py [--requests 32] [--output-tokens 128] [--sequential-requests 4]

Scenario 1: 32 requests, prompts of 64-512 tokens, 128 new tokens each (eos ignored), fp32 on CPU.
Systems: transformers `generate` one request at a time (measured on the first
--sequential-requests requests, reported as tokens/s), transformers `generate` as one padded
static batch, transformers continuous batching (`generate_batch`), and selfhost.
Scenario 2: 16 requests sharing a 1024-token prefix: mean time-to-first-token with and without
prefix caching. Issue targets: >= 10x sequential, >= 2x transformers CB, >= 1.2x static batch;
TTFT with prefix caching >= 5x lower.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import build_llama_125m  # noqa: E402


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_sequential(model, prompts, new_tokens):
    start, produced = time.perf_counter(), 0
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        produced += out.shape[1] - len(p)
    return produced / (time.perf_counter() - start)


def hf_static_batch(model, prompts, new_tokens):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - start)


def hf_continuous_batching(model, prompts, new_tokens):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model.generate_batch(prompts, generation_config=config)
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    return produced / (time.perf_counter() - start)


def selfhost_throughput(llm, prompts, new_tokens):
    from selfhost import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def mean_ttft(llm, prompts) -> float:
    """Submit all at once; time until each request's first token, averaged."""
    from selfhost import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    seqs = [engine.add_request(f"ttft-{i}-{start}", p, params) for i, p in enumerate(prompts)]
    first = {}
    while engine.has_work:
        for seq in engine.step():
            first.setdefault(seq.request_id, time.perf_counter() - start)
    return sum(first[s.request_id] for s in seqs) / len(seqs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--sequential-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="only selfhost (quick check)")
    ap.add_argument("--weight-dtype", default=None, help="bfloat16: selfhost keeps linear weights in bf16")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from selfhost import LLM

    model_dir = build_llama_125m(args.model_dir)
    prompts = make_prompts(args.requests, 64, 512, seed=0)
    llm = LLM(str(model_dir), device="cpu", kv_cache_memory="3GiB", max_num_batched_tokens=1024,
              weight_dtype=args.weight_dtype)
    llm.generate(prompts[:2], selfhost.SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    results = {"selfhost": selfhost_throughput(llm, prompts, args.output_tokens)}
    stats = llm.engine.stats()
    print(f"selfhost: {results['selfhost']:.1f} tok/s (BLAS threads settled on: {stats.cpu_threads_small_steps} "
          f"for small steps, {stats.cpu_threads_large_steps} for large)", flush=True)
    if not args.skip_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        results["hf_sequential"] = hf_sequential(hf, prompts[: args.sequential_requests], args.output_tokens)
        print(f"transformers sequential: {results['hf_sequential']:.1f} tok/s", flush=True)
        results["hf_static_batch"] = hf_static_batch(hf, prompts, args.output_tokens)
        print(f"transformers static batch: {results['hf_static_batch']:.1f} tok/s", flush=True)
        results["hf_continuous_batching"] = hf_continuous_batching(hf, prompts, args.output_tokens)
        print(f"transformers generate_batch: {results['hf_continuous_batching']:.1f} tok/s", flush=True)

    print(f"\nScenario 1: {args.requests} requests, prompts 64-512 tokens, {args.output_tokens} new tokens, "
          f"fp32, {args.threads} threads")
    for name, tok_s in results.items():
        ratio = "" if name == "selfhost" else f"   selfhost is {results['selfhost'] / tok_s:.2f}x"
        print(f"  {name:24s} {tok_s:8.1f} output tok/s{ratio}")
    print("  targets: >= 10x sequential, >= 2x generate_batch, >= 1.2x static batch")

    shared = make_prompts(1, 1024, 1024, seed=1)[0]
    prefix_prompts = [shared + p for p in make_prompts(16, 16, 48, seed=2)]
    # Two fresh engines, identical but for prefix caching: neither inherits scenario 1's
    # state (a thread-count probe due on the next steps would tilt a two-step measurement).
    ttft, hit_rate = {}, 0.0
    for caching in (False, True):
        engine_llm = LLM(str(model_dir), device="cpu", kv_cache_memory="2GiB", enable_prefix_caching=caching,
                         weight_dtype=args.weight_dtype)
        ttft[caching] = mean_ttft(engine_llm, prefix_prompts)
        hit_rate = engine_llm.engine.stats().prefix_hit_rate
        del engine_llm
    print("\nScenario 2: 16 requests sharing a 1024-token prefix, mean time to first token")
    print(f"  without prefix caching {ttft[False] * 1e3:8.0f} ms")
    print(f"  with prefix caching    {ttft[True] * 1e3:8.0f} ms   ({ttft[False] / ttft[True]:.1f}x lower; target >= 5x)")
    print(f"  prefix hit rate: {hit_rate:.0%}")

if __name__ == "__main__":
    main()
