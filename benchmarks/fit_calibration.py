"""Check `selfhost fit`'s predictions against measured runs on this machine.

Targets (issue 8): predicted memory within 15% of measured peak, predicted decode
tokens/s within 30% of measured. Where a prediction misses, fix the model in
src/selfhost/plan, not the numbers.

    python benchmarks/fit_calibration.py CHECKPOINT_DIR [--dtype fp32|fp16] [--context 512]

The predictor side (architecture from the checkpoint's config.json, this machine
measured by `--device local`) is complete. The measuring side uses only the
public API (`from selfhost import LLM, SamplingParams`) and has not been run yet:
it was written before the engine landed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selfhost.catalog import Architecture, ModelSpec
from selfhost.plan.fit import plan_fit
from selfhost.plan.local_device import measure_local_device
from selfhost.plan.precision import get_precision


def architecture_from_config(config: dict) -> Architecture:
    """Map a Llama/Qwen-style Hugging Face config.json onto the planner's Architecture."""
    heads = config["num_attention_heads"]
    return Architecture(
        layers=config["num_hidden_layers"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
        heads=heads, kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
        max_context=config.get("max_position_embeddings", 2048),
        tied_embeddings=config.get("tie_word_embeddings", False),
    )


def model_from_checkpoint(path: Path) -> ModelSpec:
    arch = architecture_from_config(json.loads((path / "config.json").read_text()))
    import datetime as dt

    return ModelSpec(
        alias=path.name, hf_repo=str(path), name=path.name, family="local", publisher="local", country="",
        release_date=dt.date.today(), licence="apache-2_0", params_b=arch.total_params() / 1e9,
        params_source="computed", arch=arch, sources=(str(path / "config.json"),), retrieved=dt.date.today(),
    )


def measure(path: Path, dtype: str, context: int, new_tokens: int) -> tuple[float, float]:
    """(peak memory bytes, decode tokens/s) of one generation. Not yet run against the engine."""
    import torch

    from selfhost import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(str(path), dtype=dtype)
    prompt = "hello " * max(1, context - new_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    llm.generate(prompt, SamplingParams(max_tokens=2))  # warm-up
    start = time.perf_counter()
    llm.generate(prompt, params)
    seconds = time.perf_counter() - start
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--predict-only", action="store_true")
    args = parser.parse_args()

    model, device = model_from_checkpoint(args.checkpoint), measure_local_device()
    report = plan_fit(model, device, get_precision(args.dtype), args.context, 1)
    print(f"device: {device.name}, {device.bandwidth_gb_s:.1f} GB/s measured")
    print(f"predicted memory {report.memory.total_bytes / 1e9:.3f} GB, decode {report.speed.decode_tok_s:.1f} tok/s")
    if args.predict_only:
        return
    peak, tok_s = measure(args.checkpoint, args.dtype, args.context, args.new_tokens)
    mem_err = report.memory.total_bytes / peak - 1
    speed_err = report.speed.decode_tok_s / tok_s - 1
    print(f"measured  memory {peak / 1e9:.3f} GB ({mem_err:+.0%}), decode {tok_s:.1f} tok/s ({speed_err:+.0%})")
    print("PASS" if abs(mem_err) <= 0.15 and abs(speed_err) <= 0.30 else "MISS: fix the model in src/selfhost/plan")


if __name__ == "__main__":
    main()
