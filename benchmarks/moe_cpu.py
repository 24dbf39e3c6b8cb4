"""Mixture of experts on CPU: selfhost vs transformers, llama.cpp, and a dense model of the same active size.

    python benchmarks/moe_cpu.py [--tokens 64] [--requests 32] [--output-tokens 32] [--threads N]
    python benchmarks/moe_cpu.py --quick        # smoke sizes
    python benchmarks/moe_cpu.py --only int8,transformers   # some rows only
    python benchmarks/moe_cpu.py --no-llama-cpp  # without llama-cpp-python (its venv is built on first use, ~9 min)

Models (random weights, built once under --model-root):
  moe    Qwen3-MoE layout scaled to ~410M total parameters: hidden 768, 12 layers, 16 experts of
         width 768, top-2 (~100M active per token, embeddings and head included)
  dense  a Llama of the same active size: hidden 768, 12 layers, MLP width 1536 (= 2 experts)
  moe int8  the MoE quantized by `selfhost quantize --method int8`
  moe/model.{f16,q8_0}.gguf  the MoE exported by `selfhost export gguf`, for the llama.cpp rows
selfhost runs the MoE and the dense model with fp32 weights and with bf16 weights
(weight_dtype="bfloat16": AMX tiles where the CPU has them), the int8 MoE once.
Each system runs in a process of its own (benchmarks/peers/), on the same token ids, one after
another, with --threads threads. Decode: one 16-token prompt, --tokens new tokens, best of
--repeats. Throughput: --requests prompts of 64-256 tokens, --output-tokens each, all at once
(transformers: one padded static batch; llama.cpp: decode only, at its fastest thread counts). Targets (issue 21): MoE decode >= 3x transformers,
>= 0.7x the dense model of its active size; batched >= 3x transformers' static batch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompts  # noqa: E402
from benchmarks.peers import options, report  # noqa: E402
from benchmarks.peers.driver import REPO_ROOT, Peer, clean_environment, measure_limits, run_peer  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=768, intermediate_size=768,
           norm_topk_prob=True)
DENSE_INTERMEDIATE = 2 * MOE["moe_intermediate_size"]  # what the two chosen experts add up to

BUILD = """
import sys, torch, transformers
from pathlib import Path
from tests.tiny_models import save_tiny_tokenizer
from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
shape, moe, dense_width, root = eval(sys.argv[1]), eval(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
torch.manual_seed(0)
for name, config in (("moe", transformers.Qwen3MoeConfig(**shape, **moe)),
                     ("dense", transformers.LlamaConfig(**shape, intermediate_size=dense_width))):
    if not (root / name / "model.safetensors").exists():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(root / name, safe_serialization=True)
        save_tiny_tokenizer(root / name)
        print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
if not (root / "moe-int8" / "model.safetensors").exists():
    quantize_checkpoint(root / "moe", root / "moe-int8", QuantConfig("int8"))
for weight_type in sys.argv[5].split(","):  # the llama.cpp rows' files, by selfhost's own exporter
    if weight_type and not (root / "moe" / f"model.{weight_type}.gguf").exists():
        from selfhost.quant.gguf_export import export_gguf
        export_gguf(root / "moe", root / "moe" / f"model.{weight_type}.gguf", weight_type)
"""


def build_models(root: Path, gguf_types: list[str]) -> dict[str, Path]:
    """The three folders (and the MoE's GGUF files), built in a separate process (the benchmark itself never
    loads torch)."""
    subprocess.run([sys.executable, "-c", BUILD, repr(SHAPE), repr(MOE), str(DENSE_INTERMEDIATE), str(root),
                    ",".join(gguf_types)], cwd=REPO_ROOT, check=True, env=clean_environment({}))
    return {name: root / name for name in ("moe", "dense", "moe-int8")}


def active_parameters() -> tuple[float, float]:
    """(total, active per token) parameters of the MoE, in millions, from its shape."""
    h, layers, vocab = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"]
    heads, kv, hd = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    attention = h * (heads + 2 * kv) * hd + heads * hd * h
    expert = 3 * h * MOE["moe_intermediate_size"]
    router = h * MOE["num_experts"]
    total = layers * (attention + router + MOE["num_experts"] * expert) + 2 * vocab * h
    active = layers * (attention + router + MOE["num_experts_per_tok"] * expert) + vocab * h  # the head, not the table
    return total / 1e6, active / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=32, help="requests in the throughput run (default: %(default)s)")
    ap.add_argument("--output-tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    ap.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-moe")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 8 tokens, 4 requests, 1 repeat")
    ap.add_argument("--threads", type=int, default=None, help="threads every system gets (default: all CPUs)")
    ap.add_argument("--peer-timeout", type=float, default=3600)
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="leave out the llama.cpp rows (the MoE exported to GGUF by selfhost, decode only)")
    options.add_llama_cpp_options(ap)
    ap.add_argument("--only", default=None, metavar="TEXT[,TEXT...]",
                    help="run only the rows whose label holds one of these texts, e.g. 'int8,transformers' "
                         "(default: every row)")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.requests, args.output_tokens, args.repeats = 8, 4, 8, 1
    threads = args.threads or len(__import__("os").sched_getaffinity(0))

    gguf_types = [] if args.no_llama_cpp else args.llama_cpp_types
    models = build_models(args.model_root, gguf_types)
    decode = {"name": "decode", "runs": [[p] for p in make_prompts(1 + args.repeats, 16, 16, seed=0)],
              "warmup_runs": 1, "max_tokens": args.tokens}
    throughput = {"name": "throughput", "runs": [make_prompts(args.requests, 64, 256, seed=10 + r)
                                                for r in range(args.repeats)],
                  "warmup_runs": 0, "max_tokens": args.output_tokens}
    both = ("decode", "throughput")
    def selfhost(label: str, weight_dtype: str | None, precision: str) -> Peer:
        return Peer("selfhost", label, {"weight_dtype": weight_dtype, "kv_cache_memory": "2GiB"}, precision, both)

    rows = [  # (peer, model folder)
        (selfhost("selfhost MoE fp32", None, "fp32"), "moe"),
        (selfhost("selfhost MoE bf16", "bfloat16", "bf16"), "moe"),
        (selfhost("selfhost MoE int8", None, "fp32"), "moe-int8"),
        (selfhost("selfhost dense (same active size) fp32", None, "fp32"), "dense"),
        (selfhost("selfhost dense (same active size) bf16", "bfloat16", "bf16"), "dense"),
        (Peer("transformers", "transformers MoE fp32", {"batching": "sequential"}, "fp32", ("decode",)), "moe"),
        (Peer("transformers", "transformers MoE static batch", {"batching": "static"}, "fp32", ("throughput",)),
         "moe"),
        # llama.cpp serves one sequence at a time through llama-cpp-python: single-stream rows only.
        *((Peer("llama_cpp", f"llama.cpp MoE {t}", {"gguf": str(models["moe"] / f"model.{t}.gguf"), "type": t},
                options.LLAMA_CPP_TYPES[t], ("decode",)), "moe") for t in gguf_types),
    ]
    if args.only:
        wanted = [text.strip().lower() for text in args.only.split(",") if text.strip()]
        rows = [(peer, model) for peer, model in rows if any(text in peer.label.lower() for text in wanted)]
        if not rows:
            ap.error(f"--only {args.only!r} matches no row; labels: selfhost MoE fp32/bf16/int8, selfhost dense "
                     "(same active size) fp32/bf16, transformers MoE fp32, transformers MoE static batch, llama.cpp "
                     "MoE f16/q8_0")
    limits, limits_error = measure_limits(threads)
    launch_args = argparse.Namespace(vllm_python=None, vllm_venv=None, vllm_pip_args="", vllm_kvcache_gib=4,
                                     vllm_threads_bind=None, vllm_multiprocessing=False, threads=threads,
                                     llama_cpp_python=args.llama_cpp_python,
                                     llama_cpp_pythonpath=args.llama_cpp_pythonpath,
                                     llama_cpp_venv=args.llama_cpp_venv, llama_cpp_cmake_args=args.llama_cpp_cmake_args)
    launch = options.launchers(launch_args)
    work_dir = Path(tempfile.mkdtemp(prefix="selfhost-bench-moe-"))
    tasks = {"decode": decode, "throughput": throughput}
    runs = []
    for peer, model in rows:
        job = {"model_dir": str(models[model]), "threads": threads, "settings": peer.settings,
               "tasks": [tasks[name] for name in peer.tasks]}
        runs.append(run_peer(peer, launch[peer.system], job, work_dir, args.peer_timeout))

    total, active = active_parameters()
    print()
    print(*report.limits_lines(limits, limits_error), sep="\n")
    print(f"\nMoE: {total:.0f}M parameters, {active:.0f}M active per token (16 experts, top-2); dense: the same "
          f"active size. {threads} threads.")
    print(f"\nSingle-stream decode: 16-token prompt, {args.tokens} new tokens, best of {args.repeats}")
    print(*report.speed_table(runs, "decode", report.best_tok_s, "tok/s", lambda v: f"{v:.1f}",
                              higher_is_better=True, extra={}), sep="\n")
    print(f"\nThroughput: {args.requests} requests of 64-256 prompt tokens, {args.output_tokens} new tokens each")
    print(*report.speed_table(runs, "throughput", report.best_tok_s, "output tok/s", lambda v: f"{v:.1f}",
                              higher_is_better=True, extra={}), sep="\n")
    by_label = {r.peer.label: r for r in runs}

    def tok_s(label: str, task: str) -> float | None:
        t = by_label[label].task(task) if label in by_label else None  # no dense int8 row
        return report.best_tok_s(t) if t else None

    hf, hf_batch = tok_s("transformers MoE fp32", "decode"), tok_s("transformers MoE static batch", "throughput")
    print("\nTargets (transformers: fp32 weights; the dense model: the same weight precision as the MoE; int8 has none):")
    for precision in ("fp32", "bf16", "int8"):
        moe, dense = tok_s(f"selfhost MoE {precision}", "decode"), tok_s(f"selfhost dense (same active size) {precision}",
                                                                         "decode")
        batch = tok_s(f"selfhost MoE {precision}", "throughput")
        if moe and hf:
            print(f"  {precision} decode vs transformers: {moe / hf:.2f}x (target >= 3x)")
        if moe and dense:
            print(f"  {precision} decode vs the dense model of the same active size: {moe / dense:.2f}x (target >= 0.7x)")
        if batch and hf_batch:
            print(f"  {precision} batched vs transformers' static batch: {batch / hf_batch:.2f}x (target >= 3x)")
    for precision, weight_type in (("bf16", "f16"), ("int8", "q8_0")):  # the same weights at the nearest type
        moe, peer = tok_s(f"selfhost MoE {precision}", "decode"), tok_s(f"llama.cpp MoE {weight_type}", "decode")
        if moe and peer:
            print(f"  {precision} decode vs llama.cpp {weight_type} on the same weights: {moe / peer:.2f}x")
    for run in runs:
        if run.error:
            print(f"  {run.peer.label}: {run.error}")


if __name__ == "__main__":
    main()
