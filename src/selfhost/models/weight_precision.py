"""weight_dtype="auto": keep an fp32 model's linear weights in fp32, or store them in bf16,
whichever runs this model faster on this CPU.

bf16 weights halve the bytes a decode step streams, and CPUs with AMX or AVX512-BF16
multiply bf16 faster than fp32. Where a CPU has neither, bf16 must be widened in
software and can lose to fp32, and a speed-up measured on one CPU says nothing about
another. So the choice is measured: the model's own MLP product (hidden -> intermediate),
fp32 against bf16, each through the kernels this CPU gets, for one row (a decode step)
and for a batch of rows (a prompt or a batched decode). bf16 is kept only where it wins
both by a margin. Quality is not measured here: bf16 weights move the demo model's
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


def _key_parts(in_features: int, out_features: int, threads: int) -> tuple[str, str]:
    return f"{in_features}x{out_features}", f"threads={threads}"


def _cache_key(in_features: int, out_features: int, threads: int) -> str:
    return CHOICES.key(*_key_parts(in_features, out_features, threads))


@torch.inference_mode()
def measure(in_features: int, out_features: int, threads: int) -> dict[str, float]:
    """Best-of-n seconds of fp32 and bf16 products of this shape, one row and BATCH_ROWS rows."""
    generator = torch.Generator().manual_seed(0)
    fp32 = Linear(in_features, out_features, bias=False)
    fp32.weight.copy_(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
    bf16 = Bf16Linear.from_linear(fp32, few_rows_max=1, layout=best_layout())
    seconds = {}
    for rows in (1, BATCH_ROWS):
        x = torch.randn(rows, in_features, generator=generator)
        for name, layer in (("float32", fp32), ("bfloat16", bf16)):
            layer(x, threads)  # warm: first-call allocation, thread start
            seconds[f"{name}@{rows}"] = best_seconds(lambda: layer(x, threads), repeats=7)
    return seconds


def choose_weight_dtype(in_features: int, out_features: int, threads: int = 1) -> PrecisionChoice:
    """bf16 or fp32 weights for a CPU model whose MLP maps in_features -> out_features."""
    seconds, cached = CHOICES.seconds(_key_parts(in_features, out_features, threads), 4,
                                      lambda: measure(in_features, out_features, threads))
    wins = all(seconds[f"float32@{rows}"] >= MIN_GAIN * seconds[f"bfloat16@{rows}"] for rows in (1, BATCH_ROWS))
    return PrecisionChoice("bfloat16" if wins else "float32", best_layout(), seconds, cached)
