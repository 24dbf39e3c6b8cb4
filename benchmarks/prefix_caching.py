"""selfhost's prefix caching: time to first token of requests sharing a long prefix, with and without it.

    python benchmarks/prefix_caching.py [--requests 16] [--prefix-tokens 1024] [--weight-dtype bfloat16]

16 requests sharing a 1024-token prefix (then 16-48 tokens of their own) are
submitted at once; the mean time until each one's first token is printed for two
fresh engines, identical but for prefix caching (target: >= 5x lower with it).
selfhost only, in this process (no peer is compared, so none can be disturbed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import build_llama_125m, make_prompts  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-dtype", default=None, help="bfloat16: selfhost keeps linear weights in bf16")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from selfhost import LLM

    model_dir = build_llama_125m(args.model_dir)
    shared = make_prompts(1, args.prefix_tokens, args.prefix_tokens, seed=1)[0]
    prompts = [shared + p for p in make_prompts(args.requests, 16, 48, seed=2)]
    # Two fresh engines, identical but for prefix caching: neither inherits the other's
    # state (a thread-count probe due on the next steps would tilt a two-step measurement).
    ttft, hit_rate = {}, 0.0
    for caching in (False, True):
        llm = LLM(str(model_dir), device="cpu", kv_cache_memory="2GiB", enable_prefix_caching=caching,
                  weight_dtype=args.weight_dtype)
        ttft[caching] = mean_ttft(llm, prompts)
        hit_rate = llm.engine.stats().prefix_hit_rate
        del llm
    print(f"{args.requests} requests sharing a {args.prefix_tokens}-token prefix, mean time to first token")
    print(f"  without prefix caching {ttft[False] * 1e3:8.0f} ms")
    print(f"  with prefix caching    {ttft[True] * 1e3:8.0f} ms   ({ttft[False] / ttft[True]:.1f}x lower; target >= 5x)")
    print(f"  prefix hit rate: {hit_rate:.0%}")


if __name__ == "__main__":
    main()
