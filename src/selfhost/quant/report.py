"""fp32 / int8 / int4 side by side: weight memory, single-stream decode speed, perplexity.

Each variant is the same checkpoint loaded in full precision and quantized on
the fly, which gives the same modules and numbers as a saved quantized copy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from selfhost.quant.config import QuantConfig

@dataclass(frozen=True)
class VariantResult:
    name: str
    weight_bytes: int
    decode_tok_s: float  # median over repeats
    perplexity: float | None


def _decode_tok_s(llm, num_tokens: int, repeats: int) -> float:
    from selfhost import SamplingParams

    prompt = list(range(3, 19))
    params = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up: allocator, thread pools, kernel packing
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        rates.append(len(out.token_ids) / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(model: str, text: str | None, variants: dict[str, QuantConfig | None], decode_tokens: int = 64,
            repeats: int = 3, window: int | None = None) -> list[VariantResult]:
    """One row per variant (None = full precision), the model loaded afresh for each."""
    from selfhost import LLM
    from selfhost.quant.apply import quantize_model, weight_bytes
    from selfhost.quant.perplexity import encode_text, perplexity

    results = []
    for name, config in variants.items():
        llm = LLM(model, device="cpu", dtype="float32", max_num_seqs=1)
        if config is not None:
            quantize_model(llm.model, config)
        ppl = perplexity(llm.model, encode_text(llm.tokenizer, text), window).perplexity if text else None
        results.append(VariantResult(name, weight_bytes(llm.model), _decode_tok_s(llm, decode_tokens, repeats), ppl))
        del llm
    return results


def print_table(results: list[VariantResult]) -> None:
    from selfhost.cli.console import make_console
    from rich.table import Table

    base = results[0]
    table = Table(title="quantization: fp32 vs int8 vs int4 (CPU, single stream)")
    for col in ("variant", "weights MB", "x fp32", "decode tok/s", "x fp32", "perplexity", "vs fp32"):
        table.add_column(col, justify="right")
    for r in results:
        ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
        dppl = f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%" if r.perplexity and base.perplexity else "-"
        table.add_row(r.name, f"{r.weight_bytes / 1e6:.1f}", f"{r.weight_bytes / base.weight_bytes:.3f}",
                      f"{r.decode_tok_s:.1f}", f"{r.decode_tok_s / base.decode_tok_s:.2f}", ppl, dppl)
    make_console().print(table)


def plot(results: list[VariantResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("weight memory (MB)", [r.weight_bytes / 1e6 for r in results]),
              ("decode (tok/s)", [r.decode_tok_s for r in results])]
    if all(r.perplexity is not None for r in results):
        panels.append(("perplexity", [r.perplexity for r in results]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    names = [r.name for r in results]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=["#777777", "#2a7ab0", "#d9822b"][: len(names)])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
