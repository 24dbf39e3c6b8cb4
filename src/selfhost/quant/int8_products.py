"""From how many rows an int8 linear layer's product widens its weights to bf16 instead of
quantizing the activations (quant/_int8_cpu.c's `linear_widened` against its `linear`).

The int8 dots (activations in int8 blocks, exact int32 sums) read each weight once per row group
but pay per-block work for every row: ~140 GOP/s on two Xeon cores without AMX at any row count.
Widening the integers (exact in bf16) into layers/_bf16_tiles_cpu.c's layout costs one pass over
the weights per call, then runs the many-row bf16 product on the exact fp32 rows: 2-2.6x faster
from 32 rows there, slower below 16 (2026-12-07). Where the crossover lies depends on the CPU (with
AMX the widened product runs on tiles), so it is measured once per CPU on the model's MLP shape
(capped) and cached (models/measured_choices.py).

Without AMX, where AVX-512 VNNI runs, a third product takes every row count from 2: the dots' own int8
blocks on a register-blocked VNNI kernel (quant/_int8_rows_vnni.h), ahead of both the dots and the
widened product there (2026-12-07), so the widened switch is not measured on such CPUs (quant/apply.py).
"""

from __future__ import annotations

import logging
import sys

import torch

from selfhost.models.measured_choices import MeasuredChoices, takeover_rows
from selfhost.timing import best_seconds

log = logging.getLogger(__name__)

PROBE_ROWS = (8, 16, 24, 32, 48, 64)
PROBE_MAX_IN, PROBE_MAX_OUT = 1024, 4096
MIN_GAIN = 1.05
NEVER = sys.maxsize
CHOICES = MeasuredChoices("int8_products")


def widened_available() -> bool:
    from selfhost.quant.int8 import _int8_cpu, avx2_available

    return avx2_available() and _int8_cpu.widened_available()


@torch.inference_mode()
def measure(in_features: int, out_features: int, threads: int) -> dict[str, float]:
    from selfhost.quant.int8 import _int8_cpu, quantize_int8

    generator = torch.Generator().manual_seed(0)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=generator))
    seconds = {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        out = torch.empty(rows, out_features)
        args = (x.data_ptr(), q.data_ptr(), scales.data_ptr(), 0, out.data_ptr(), rows, out_features, in_features,
                threads)
        for name, product in (("dots", _int8_cpu.linear), ("widened", _int8_cpu.linear_widened)):
            product(*args)  # warm
            seconds[f"{name}@{rows}"] = best_seconds(lambda: product(*args))
    return seconds


def widened_from_rows(in_features: int, out_features: int, threads: int) -> int:
    """Rows from which int8 layers of this shape take the widened product; NEVER where it never pays
    or cannot run (no AVX-512 tile kernels, or an input width that is not a multiple of 32)."""
    if not widened_available() or in_features % 32:
        return NEVER
    shape = (min(in_features, PROBE_MAX_IN) // 32 * 32, min(out_features, PROBE_MAX_OUT))
    seconds, cached = CHOICES.seconds((f"{shape[0]}x{shape[1]}", f"threads={threads}"), 2 * len(PROBE_ROWS),
                                      lambda: measure(*shape, threads))
    switch = takeover_rows({r: seconds[f"dots@{r}"] for r in PROBE_ROWS},
                           {r: seconds[f"widened@{r}"] for r in PROBE_ROWS}, MIN_GAIN)
    log.debug("int8 products: activations in int8 blocks, weights widened to bf16 %s (%s)",
             "never" if switch is None else f"from {switch} rows", "cached measurement" if cached else "measured now")
    return NEVER if switch is None else switch


VNNI_FROM_ROWS = 2  # one row keeps the dots: packing a strip costs more than their single pass over it


def vnni_available() -> bool:
    """The register-blocked VNNI kernel (quant/_int8_rows_vnni.h) runs here, and AMX does not (where it
    does, the widened product runs on tiles and stays the many-row choice)."""
    from selfhost.layers.bf16_linear import amx_available
    from selfhost.quant.int8 import _int8_cpu, avx2_available

    return avx2_available() and _int8_cpu.vnni_available() and not amx_available()


def vnni_from_rows() -> int:
    """Rows from which int8 layers take the VNNI kernel instead of the dots and the widened product
    (on a Xeon without AMX, 2026-12-07: 4-6x the widened product from 256 rows in a MoE layer, ahead
    of the dots from 2 rows); NEVER where it cannot run."""
    return VNNI_FROM_ROWS if vnni_available() else NEVER
