"""Offline throughput and time to first token: selfhost vs transformers vs vLLM's CPU build.

    python benchmarks/throughput.py [--requests 32] [--output-tokens 128] [--systems selfhost,transformers,vllm]
    python benchmarks/throughput.py --quick        # a smoke run: 4 short requests, 8 new tokens

Each system runs in a process of its own with only its own documented settings
(benchmarks/peers/), on the same token ids, one after another; each gets --threads
threads. The machine's read bandwidth and peak matmul rates are measured first.
--rounds N runs the whole list N times in turn, each row's timed runs pooled.

Throughput: --requests requests with prompts of 64-512 tokens, --output-tokens new
tokens each (eos ignored, greedy), all submitted at once; output tokens/s.
transformers runs three ways (--transformers-batching): its continuous batching
(`generate_batch`), one padded static batch, and one request at a time (on the
first --sequential-requests requests only, reported as tokens/s).
Prompt: one prompt of --ttft-tokens, time to its first token, best of --ttft-repeats,
each on a prompt of its own; prompt GFLOP/s and its share of the peak matmul rate
at the row's weight precision. "speed-up" is how many times faster the selfhost row
is than the row (> 1: selfhost is faster); "same tokens" compares every output with
the first selfhost row's. selfhost's prefix-caching scenario is benchmarks/prefix_caching.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompts  # noqa: E402
from benchmarks.peers import options, report  # noqa: E402
from benchmarks.peers.driver import Peer, ensure_model, measure_limits, run_peers  # noqa: E402

TRANSFORMERS_BATCHING = {"continuous": "transformers generate_batch", "static": "transformers static batch",
                         "sequential": "transformers sequential"}
KV_CACHE = "3GiB"  # selfhost's KV cache: every request's blocks fit at once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests submitted at once (default: %(default)s)")
    ap.add_argument("--output-tokens", type=int, default=128, help="new tokens per request (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed throughput runs, each on prompts of its own, best kept (default: %(default)s)")
    ap.add_argument("--transformers-batching", default=",".join(TRANSFORMERS_BATCHING),
                    type=options.list_of(tuple(TRANSFORMERS_BATCHING), "--transformers-batching"),
                    help="transformers rows: continuous, static, sequential (default: %(default)s)")
    ap.add_argument("--sequential-requests", type=int, default=4,
                    help="requests transformers runs one at a time (default: %(default)s)")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers rows (same as leaving it out of --systems)")
    ap.add_argument("--ttft-tokens", type=int, default=1024,
                    help="prompt length for time to first token; 0 skips it (default: %(default)s)")
    ap.add_argument("--ttft-repeats", type=int, default=3, help="timed prompt runs (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke sizes: 4 requests of 16-64 tokens, 8 new tokens, 2 sequential, a 128-token prompt once")
    options.add_peer_options(ap)
    args = ap.parse_args()
    amx_lines = options.keep_amx_off(args)
    prompt_range = (64, 512)
    if args.quick:
        args.requests, args.output_tokens, args.sequential_requests = 4, 8, 2
        args.ttft_tokens, args.ttft_repeats, prompt_range = 128, 1, (16, 64)

    # Every run draws prompts of its own, so no engine's prefix cache holds a timed prompt.
    prompt_sets = [make_prompts(args.requests, *prompt_range, seed=run) for run in range(args.repeats)]
    throughput = {"name": "throughput", "runs": prompt_sets, "warmup_runs": 0, "max_tokens": args.output_tokens}
    sequential = {**throughput, "runs": [p[: args.sequential_requests] for p in prompt_sets]}
    ttft_prompts = make_prompts(1 + args.ttft_repeats, args.ttft_tokens, args.ttft_tokens, seed=1000)
    ttft = {"name": "ttft", "runs": [[p] for p in ttft_prompts], "warmup_runs": 1, "max_tokens": 1}
    names = ("throughput", "ttft") if args.ttft_tokens else ("throughput",)

    peers = options.selfhost_peers(args, names, kv_cache_memory=KV_CACHE)
    if "transformers" in args.systems and not args.skip_hf:
        batching = args.transformers_batching
        # One transformers row is timed on the prompt: plain `generate`, its usual single-request call.
        prompt_row = "sequential" if "sequential" in batching else batching[0]
        peers += [Peer("transformers", TRANSFORMERS_BATCHING[b], {"batching": b}, "fp32",
                       names if b == prompt_row else ("throughput",)) for b in batching]
    model_dir = ensure_model(args.model_dir)
    peers += options.vllm_peers(args, names, model_dir)
    limits, limits_error = measure_limits(args.threads)
    launch = options.launchers(args)
    work_dir = Path(tempfile.mkdtemp(prefix="selfhost-bench-throughput-"))

    def job_for(peer: Peer) -> dict:
        tasks = {"throughput": sequential if peer.settings.get("batching") == "sequential" else throughput,
                 "ttft": ttft}
        return {"model_dir": str(model_dir), "threads": args.threads, "settings": peer.settings,
                "tasks": [tasks[name] for name in peer.tasks]}

    runs = run_peers(peers, launch, job_for, work_dir, args.peer_timeout, args.rounds)

    print()
    print(*report.limits_lines(limits, limits_error), *amx_lines, sep="\n")
    print(f"\n{args.requests} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens, {args.output_tokens} new "
          f"tokens each, all submitted at once, {args.threads} threads (transformers sequential: first "
          f"{args.sequential_requests} requests)")
    print(*report.speed_table(runs, "throughput", report.best_tok_s, "output tok/s", lambda v: f"{v:.1f}",
                              higher_is_better=True, extra={}), sep="\n")
    report.print_ttft_and_footer(runs, limits, model_dir, args.ttft_tokens if args.ttft_tokens else 0,
                                 args.ttft_repeats * args.rounds, work_dir, args.save_json)


if __name__ == "__main__":
    main()
