"""Single-stream decode and time to first token: selfhost vs transformers vs vLLM's CPU build vs llama.cpp.

    python benchmarks/decode_cpu.py [--tokens 128] [--repeats 3] [--systems selfhost,transformers,vllm,llama_cpp]
    python benchmarks/decode_cpu.py --quick        # a smoke run: few tokens, short prompts

Each system runs in a process of its own with only its own documented settings
(benchmarks/peers/), on the same token ids, one after another; each gets --threads
threads. The machine's read bandwidth and peak matmul rates are measured first.
--rounds N runs the whole list N times in turn and pools each row's timed runs: on a
VM whose speed drifts over minutes, every row then gets some of the fast minutes.

Decode: one prompt of --prompt-tokens, --tokens new tokens (eos ignored, greedy),
best of --repeats runs, each on a prompt of its own. Columns: new tokens/s over the
whole call (the short prompt included, as a user sees it); selfhost's
speed-up over the row (> 1: selfhost is faster); the weight bytes one token reads
and the share of the measured read bandwidth that makes at the row's speed.
Prompt: one prompt of --ttft-tokens, time to its first token, best of --ttft-repeats;
prompt GFLOP/s and its share of the peak matmul rate at the row's weight precision.
"same tokens" compares every output with the first selfhost row's, token for token.
llama.cpp reads a GGUF of the same model written by `selfhost export gguf` (--llama-cpp-types
f16,q8_0; kept beside the model) and picks its fastest thread counts itself (peers/llama_cpp_peer.py).
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

TASKS = ("decode", "ttft")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode run (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="decode prompt length (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode runs, best kept (default: %(default)s)")
    ap.add_argument("--ttft-tokens", type=int, default=1024,
                    help="prompt length for time to first token; 0 skips it (default: %(default)s)")
    ap.add_argument("--ttft-repeats", type=int, default=3, help="timed prompt runs (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 8 tokens, 1 repeat, a 128-token prompt")
    options.add_peer_options(ap, options.SINGLE_STREAM_SYSTEMS)
    args = ap.parse_args()
    amx_lines = options.keep_amx_off(args)
    if args.quick:
        args.tokens, args.repeats, args.ttft_tokens, args.ttft_repeats = 8, 1, 128, 1

    tasks = {"decode": _task("decode", args.prompt_tokens, args.tokens, args.repeats, seed=0)}
    if args.ttft_tokens:
        tasks["ttft"] = _task("ttft", args.ttft_tokens, 1, args.ttft_repeats, seed=1)
    names = tuple(tasks)
    peers = [*options.selfhost_peers(args, names)]
    if "transformers" in args.systems:
        peers.append(Peer("transformers", "transformers fp32", {"batching": "sequential"}, "fp32", names))
    model_dir = ensure_model(args.model_dir)
    peers += options.vllm_peers(args, names, model_dir)
    peers += options.llama_cpp_peers(args, names, lambda weight_type: _gguf(model_dir, weight_type))
    limits, limits_error = measure_limits(args.threads)
    launch = options.launchers(args)
    work_dir = Path(tempfile.mkdtemp(prefix="selfhost-bench-decode-"))
    runs = run_peers(peers, launch, lambda peer: {"model_dir": str(model_dir), "threads": args.threads,
                                                  "settings": peer.settings,
                                                  "tasks": [tasks[name] for name in peer.tasks]},
                     work_dir, args.peer_timeout, args.rounds)

    print()
    print(*report.limits_lines(limits, limits_error), *amx_lines, sep="\n")
    print(f"\nSingle-stream decode: Llama-shaped ~125M random model, prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} new tokens, best of {args.repeats * args.rounds}, {args.threads} threads")
    print(*report.speed_table(runs, "decode", report.best_tok_s, "tok/s", lambda v: f"{v:.1f}",
                              higher_is_better=True, extra=report.decode_extra_columns(limits, model_dir)),
          report.DECODE_LEGEND, sep="\n")
    report.print_ttft_and_footer(runs, limits, model_dir, args.ttft_tokens if "ttft" in tasks else 0,
                                 args.ttft_repeats * args.rounds, work_dir, args.save_json)


def _gguf(model_dir: Path, weight_type: str) -> Path:
    """The model as a GGUF file of `weight_type`, written once beside it by selfhost's exporter."""
    path = model_dir / f"model.{weight_type}.gguf"
    if not path.exists():
        from selfhost.quant.gguf_export import export_gguf

        export_gguf(model_dir, path, weight_type)
    return path


def _task(name: str, prompt_tokens: int, max_tokens: int, repeats: int, seed: int) -> dict:
    """One warm-up run and `repeats` timed runs, each on a prompt of its own."""
    prompts = make_prompts(1 + repeats, prompt_tokens, prompt_tokens, seed)
    return {"name": name, "runs": [[p] for p in prompts], "warmup_runs": 1, "max_tokens": max_tokens}


if __name__ == "__main__":
    main()
