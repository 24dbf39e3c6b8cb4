"""weight_dtype="auto": keep an fp32 model's linear weights in fp32, or store them in bf16,
whichever runs this model faster on this CPU.

bf16 weights halve the bytes a decode step streams, and CPUs with AMX or AVX512-BF16
multiply bf16 faster than fp32. Where a CPU has neither, bf16 must be widened in
software and can lose to fp32, and a speed-up measured on one CPU says nothing about
another. So the choice is measured: the model's own MLP product (hidden -> intermediate),
fp32 against bf16, each through the kernels this CPU gets, for one row (a decode step)
and for a batch of rows (a prompt or a batched decode). bf16 is kept only where it wins
both by a margin.

A decode step streams every weight of the model once, so a product's weights come from
wherever the whole model fits, not from the core's own cache: the probe sweeps as many
copies of the product as the model's linear weights fill (up to WORKING_SET_CAP), and
times a product as a sweep divided by the copies. Timing one small product alone had
kept it hot in L2: for the demo model (160x432, 8.8 MB of fp32 weights) that read bf16
and fp32 as a tie (8.5 vs 8.8 us) and kept fp32, while in the engine the bf16 model
decoded 1.26x faster (3,185 against 2,519 tok/s, 2-core Xeon without AMX, 2026-12-07). Quality is not measured here: bf16 weights move the demo model's
held-out perplexity by under 0.01% (benchmarks/precision_quality.py); ask for
weight_dtype="float32" for exact parity with transformers.

The answer is cached per CPU model, ISA flags, shape, thread count and selfhost
version (models/measured_choices.py), so later loads skip the probe (~1 s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from selfhost.layers.bf16_linear import Bf16Linear, best_layout
from selfhost.layers.linear import Linear
from selfhost.models.measured_choices import MeasuredChoices
from selfhost.timing import best_seconds

log = logging.getLogger(__name__)

BATCH_ROWS = 64  # a prompt chunk or a batched decode step
MIN_GAIN = 1.1  # bf16 must be this much faster at both sizes: a tie keeps the exact weights
# The most fp32 weight bytes the probe sweeps: beyond the last-level cache of any CPU it meets, a
# larger set reads from memory just the same, and the probe's copies cost memory and time.
WORKING_SET_CAP = 128 << 20


@dataclass(frozen=True)
class PrecisionChoice:
    weight_dtype: str  # "float32" or "bfloat16"
    layout: str  # the bf16 layout measured ("tiles", "rows")
    seconds: dict[str, float]  # "float32@1", "bfloat16@1", "float32@64", "bfloat16@64"
    cached: bool

    def speedups(self) -> tuple[float, float]:
        """bf16's speed-up over fp32 for one row and for a batch."""
        s = self.seconds
        return s["float32@1"] / s["bfloat16@1"], s[f"float32@{BATCH_ROWS}"] / s[f"bfloat16@{BATCH_ROWS}"]

    def describe(self) -> str:
        one, batch = self.speedups()
        source = "cached measurement" if self.cached else "measured now"
        return (f"weights {self.weight_dtype} (auto: bf16 {one:.2f}x fp32 for one row, {batch:.2f}x for "
                f"{BATCH_ROWS} rows on this CPU, {source})")


CHOICES = MeasuredChoices("weight_precision")


def cache_path() -> Path:
    return CHOICES.path


def copies_for(in_features: int, out_features: int, streamed_bytes: int | None) -> int:
    """Copies of the product the probe sweeps: as many as `streamed_bytes` of fp32 weights fill (capped),
    rounded down to a power of two, so that two counts of nearly the same bytes (the loader's, of the
    modules; the planner's, from the architecture) ask for the same cached measurement."""
    if not streamed_bytes:
        return 1
    fill = max(1, min(streamed_bytes, WORKING_SET_CAP) // (4 * in_features * out_features))
    return 1 << (fill.bit_length() - 1)


def _key_parts(in_features: int, out_features: int, threads: int, copies: int) -> tuple[str, ...]:
    return f"{in_features}x{out_features}", f"threads={threads}", f"copies={copies}"


def _cache_key(in_features: int, out_features: int, threads: int, copies: int = 1) -> str:
    return CHOICES.key(*_key_parts(in_features, out_features, threads, copies))


@torch.inference_mode()
def measure(in_features: int, out_features: int, threads: int, copies: int = 1) -> dict[str, float]:
    """Best-of-n seconds of fp32 and bf16 products of this shape, one row and BATCH_ROWS rows, each a sweep
    over `copies` copies of the weights divided by `copies` (see the module's docstring)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    layers = {"float32": [], "bfloat16": []}
    for _ in range(copies):
        fp32 = Linear(in_features, out_features, bias=False)
        fp32.weight.copy_(weight)
        layers["float32"].append(fp32)
        layers["bfloat16"].append(Bf16Linear.from_linear(fp32, few_rows_max=1, layout=best_layout()))
    seconds = {}
    for rows in (1, BATCH_ROWS):
        x = torch.randn(rows, in_features, generator=generator)
        for name, sweep in layers.items():
            sweep[0](x, threads)  # warm: first-call allocation, thread start

            def run(sweep=sweep):
                for layer in sweep:
                    layer(x, threads)

            seconds[f"{name}@{rows}"] = best_seconds(run, repeats=7) / copies
    return seconds


def choose_weight_dtype(in_features: int, out_features: int, threads: int = 1,
                        streamed_bytes: int | None = None) -> PrecisionChoice:
    """bf16 or fp32 weights for a CPU model whose MLP maps in_features -> out_features and whose decode step
    streams `streamed_bytes` of fp32 linear weights (None: the one product, hot in cache)."""
    copies = copies_for(in_features, out_features, streamed_bytes)
    seconds, cached = CHOICES.seconds(_key_parts(in_features, out_features, threads, copies), 4,
                                      lambda: measure(in_features, out_features, threads, copies))
    wins = all(seconds[f"float32@{rows}"] >= MIN_GAIN * seconds[f"bfloat16@{rows}"] for rows in (1, BATCH_ROWS))
    return PrecisionChoice("bfloat16" if wins else "float32", best_layout(), seconds, cached)
