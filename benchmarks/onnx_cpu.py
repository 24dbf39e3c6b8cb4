"""ONNX Runtime vs selfhost on CPU, same weights, same run: single-stream decode and a 256-token prompt.

    python benchmarks/onnx_cpu.py [--tokens 128] [--prompt-tokens 256] [--repeats 3] [--rows ...]
    python benchmarks/onnx_cpu.py --quick        # a smoke run: few tokens, one repeat

The ~125M Llama-shaped random model (benchmarks/common.py) is exported with
`selfhost export onnx` (fp32 and int4, plus fp32 with the standard-operator
attention, the alternative the exporter's fused GroupQueryAttention was chosen
over) and run through `LLM(DIR)`, so both runtimes pay the same API, sampling
and detokenizing costs. selfhost runs fp32 (weights as loaded), int8 and int4.
Every row runs in a process of its own, one after another (ONNX Runtime's and
selfhost's thread pools never compete), each runtime with its own default
threads over the CPUs available (ONNX Runtime: one per physical core).

decode: a 16-token prompt, then --tokens new tokens (greedy, eos ignored), best
of --repeats; new tokens/s over the whole call. prompt: time to the first token
of a --prompt-tokens prompt, best of --repeats. Ratios are against selfhost fp32
(> 1: faster than it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import build_llama_125m, make_prompts  # noqa: E402

# name -> (runtime, precision, export settings or selfhost quantization)
ROWS = {
    "selfhost fp32": ("selfhost", None),
    "selfhost int8": ("selfhost", "int8"),
    "selfhost int4": ("selfhost", "int4"),
    "onnxruntime fp32": ("onnx", {"dtype": "fp32"}),
    "onnxruntime int4": ("onnx", {"dtype": "fp32", "quant": "int4"}),
    "onnxruntime fp32 plain-attention": ("onnx", {"dtype": "fp32", "attention": "plain"}),
}
DECODE_PROMPT_TOKENS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode run (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for time to first token")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, best kept")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 4 tokens, a 32-token prompt, one repeat")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.prompt_tokens, args.repeats = 4, 32, 1
    if args.worker:
        print(json.dumps(_measure(json.loads(args.worker))))
        return

    from selfhost.bench.machine_limits import available_cpu_count
    from selfhost.cpu_identity import read_cpu_identity

    threads = available_cpu_count()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from: {', '.join(ROWS)}")
    model_dir = build_llama_125m(args.model_dir)
    export_root = Path(tempfile.mkdtemp(prefix="selfhost-bench-onnx-"))
    try:
        results = _run_rows(names, model_dir, export_root, args)
    finally:
        shutil.rmtree(export_root, ignore_errors=True)  # the exports are ~0.5 GB each
    _print_report(results, read_cpu_identity(), threads, args)


def _run_rows(names: list[str], model_dir: Path, export_root: Path, args) -> dict:
    results = {}
    for name in names:
        runtime, setting = ROWS[name]
        folder = str(model_dir)
        if runtime == "onnx":
            folder = str(_export(model_dir, export_root / name.replace(" ", "_"), setting))
        job = {"folder": folder, "quantization": setting if runtime == "selfhost" else None,
               "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats}
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        if runtime == "onnx":
            shutil.rmtree(folder)  # ~0.5 GB each: one on disk at a time
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _export(model_dir: Path, out: Path, setting: dict) -> Path:
    from selfhost.onnx.export import export_onnx
    from selfhost.onnx.export_info import OnnxExportConfig

    return export_onnx(model_dir, out, OnnxExportConfig(**setting)).folder


def _measure(job: dict) -> dict:
    """Runs in the worker process: one row's decode tok/s and prompt time, and the tokens it generated."""
    from selfhost import LLM, SamplingParams  # first: sets the OpenMP wait policy before torch loads

    kwargs = {} if job["quantization"] is None else {"quantization": job["quantization"]}
    if "selfhost_onnx.json" not in os.listdir(job["folder"]):
        kwargs.update(weight_dtype=None, max_num_seqs=1)  # weights as loaded: the fp32 baseline is fp32
    llm = LLM(job["folder"], device="cpu", **kwargs)
    greedy = SamplingParams(max_tokens=job["tokens"], temperature=0.0, ignore_eos=True)
    decode_prompts = make_prompts(job["repeats"] + 1, DECODE_PROMPT_TOKENS, DECODE_PROMPT_TOKENS, seed=0)
    long_prompts = make_prompts(job["repeats"] + 1, job["prompt_tokens"], job["prompt_tokens"], seed=1)
    llm.generate([decode_prompts[-1]], greedy)  # warm-up (first-run allocations, kernel choices)
    decode_s, tokens = [], None
    for prompt in decode_prompts[:-1]:
        start = time.perf_counter()
        [out] = llm.generate([prompt], greedy)
        decode_s.append(time.perf_counter() - start)
        tokens = tokens or out.token_ids
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([long_prompts[-1]], first)
    prompt_s = []
    for prompt in long_prompts[:-1]:
        start = time.perf_counter()
        llm.generate([prompt], first)
        prompt_s.append(time.perf_counter() - start)
    return {"decode_tok_s": job["tokens"] / min(decode_s), "prompt_ms": 1000 * min(prompt_s), "tokens": tokens}


def _print_report(results: dict, cpu, threads: int, args) -> None:
    import onnxruntime
    import torch

    print(f"\nCPU: {cpu.model} ({', '.join(cpu.isa_flags) or 'no listed ISA flags'}); {threads} CPUs available; "
          f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"~125M Llama shape, random weights. decode: {DECODE_PROMPT_TOKENS}-token prompt + {args.tokens} new tokens; "
          f"prompt: {args.prompt_tokens} tokens to the first token; best of {args.repeats}\n")
    base = results.get("selfhost fp32")
    header = f"{'row':36} {'decode tok/s':>12} {'x fp32':>7} {'prompt ms':>10} {'x fp32':>7}  same tokens"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        decode_ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        prompt_ratio = f"{base['prompt_ms'] / r['prompt_ms']:.2f}" if base else "-"
        same = "-" if not base else ("yes" if r["tokens"] == base["tokens"] else "no")
        print(f"{name:36} {r['decode_tok_s']:12.1f} {decode_ratio:>7} {r['prompt_ms']:10.1f} {prompt_ratio:>7}  {same}")
    print("\nx fp32: speed relative to selfhost fp32 (> 1 faster). same tokens: greedy decode output equal to "
          "selfhost fp32's (quantized rows may differ: their weights are rounded).")


if __name__ == "__main__":
    main()
