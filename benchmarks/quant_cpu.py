"""Single-stream decode on CPU: selfhost int8 (and int4) vs selfhost fp32 vs llama.cpp Q8_0, same weights, same run.

    python benchmarks/quant_cpu.py [--tokens 64] [--threads 2] [--repeats 5]

The ~125M Llama-shaped random model (benchmarks/common.py) is quantized on the
fly by selfhost and exported to a Q8_0 GGUF for llama.cpp (llama-cpp-python;
skipped with a note if it is not installed). Runs are interleaved so every
engine sees the same machine state; medians are printed with the load average.
Issue targets: int8 >= 2.5x selfhost fp32, int8 >= 1.0x llama.cpp Q8_0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import build_llama_125m, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-int4", action="store_true", help="Skip the int4 row.")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")  # fp32 matmuls run on OpenBLAS: same thread budget

    from selfhost import LLM, SamplingParams
    from selfhost.quant.apply import weight_bytes
    from selfhost.quant.gguf_export import export_gguf

    model_dir = build_llama_125m(args.model_dir)
    prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    engines, memory = {}, {}
    for name, quantization in (("selfhost fp32", None), ("selfhost int8", "int8"), ("selfhost int4", "int4")):
        if name.endswith("int4") and args.no_int4:
            continue
        llm = LLM(str(model_dir), device="cpu", max_num_seqs=1, quantization=quantization)
        memory[name] = weight_bytes(llm.model)
        engines[name] = lambda llm=llm: llm.generate([prompt], params)[0].token_ids

    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: skipping llama.cpp Q8_0 (pip install llama-cpp-python)")
    else:
        gguf_path = args.model_dir / "model.q8_0.gguf"
        if not gguf_path.exists():
            export_gguf(model_dir, gguf_path, "q8_0")
        memory["llama.cpp Q8_0"] = gguf_path.stat().st_size
        lc = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=args.threads, n_batch=512, verbose=False)

        def llama_cpp_generate():
            out = []
            for token in lc.generate(prompt, temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == args.tokens:
                    return out

        engines["llama.cpp Q8_0"] = llama_cpp_generate

    for fn in engines.values():  # warm-up: allocator, thread pools, kernel packing
        fn()
    rates: dict[str, list[float]] = {name: [] for name in engines}
    outputs = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, fn in engines.items():
            seconds, tokens = timed(fn)
            rates[name].append(len(tokens) / seconds)
            outputs[name] = tokens
    load_after = os.getloadavg()[0]

    median = {name: statistics.median(r) for name, r in rates.items()}
    if max(load_before, load_after) > (os.cpu_count() or 1):
        print("warning: the machine was oversubscribed during the runs; OpenBLAS's fp32 threads degrade the most "
              "under contention, so the int8/fp32 ratio is inflated (compare with --threads 1)")
    print(f"model: Llama-shaped ~125M (hidden 576, 30 layers, 9/3 heads, vocab 32000), {args.threads} threads, "
          f"prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, median of {args.repeats}; "
          f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs")
    for name in engines:
        runs = ", ".join(f"{x:.1f}" for x in rates[name])
        print(f"  {name:15s} {median[name]:7.1f} tok/s   weights {memory[name] / 1e6:6.1f} MB   (runs: {runs})")
    int8 = median["selfhost int8"]
    print(f"  int8 / fp32:            {int8 / median['selfhost fp32']:.2f}x (target >= 2.5x)")
    if "llama.cpp Q8_0" in median:
        print(f"  int8 / llama.cpp Q8_0:  {int8 / median['llama.cpp Q8_0']:.2f}x (target >= 1.0x)")
    same = sum(a == b for a, b in zip(outputs["selfhost int8"], outputs["selfhost fp32"]))
    print(f"  int8 greedy tokens equal to fp32: {same}/{args.tokens} (random weights: near-tied logits let greedy "
          "paths part; quality is measured by tests/quant and `selfhost quantize --report`)")


if __name__ == "__main__":
    main()
