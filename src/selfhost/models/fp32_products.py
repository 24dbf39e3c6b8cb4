"""From how many rows an fp32 CPU model's linear layers hand their products to torch (MKL).

selfhost's AVX-512 GEMM (`layers/_gemm_cpu.c`) was written where MKL takes slow generic
paths (AMD): there it wins at every size, and every product stays on it. On an Intel Xeon,
MKL's sgemm is tuned to the core and overtook it from ~100-250 rows (1.2-1.75x at 256-1024 rows
on two Xeon cores without AMX, 2026-12-07), while ours kept its lead on decode-sized steps
(1.3-2.4x at 32 rows). So the switch is measured on the model's MLP shape (capped: the
crossover moves little with size, and a 7B model's full shape would make the probe slow),
once per CPU, and cached (models/measured_choices.py). Both sides sum in fp32; only the order
of the sums differs.

Experts of a mixture keep selfhost's product at every size: their C call (layers/moe.py) and
the Python loop it is checked against must run the same one.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from selfhost.layers import linear
from selfhost.layers.linear import Linear
from selfhost.layers.moe import expert_module_ids
from selfhost.models.measured_choices import MeasuredChoices, takeover_rows
from selfhost.timing import best_seconds

log = logging.getLogger(__name__)

PROBE_ROWS = (64, 128, 256, 512, 1024)
PROBE_MAX_IN, PROBE_MAX_OUT = 1024, 4096
MIN_GAIN = 1.05  # torch must be this much faster: a tie keeps selfhost's kernel
NEVER = sys.maxsize
CHOICES = MeasuredChoices("fp32_products")


@torch.inference_mode()
def measure(in_features: int, out_features: int, threads: int) -> dict[str, float]:
    """Best-of-n seconds of selfhost's product and torch's at each of PROBE_ROWS rows."""
    generator = torch.Generator().manual_seed(0)
    ours = Linear(in_features, out_features, bias=False)  # blas_from_rows: NEVER, the class default
    ours.weight.copy_(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = {}
        for rows in PROBE_ROWS:
            x = torch.randn(rows, in_features, generator=generator)
            for name, run in (("selfhost", lambda: ours(x, threads)), ("torch", lambda: F.linear(x, ours.weight))):
                run()  # warm: first-call allocation, packing buffers, thread start
                seconds[f"{name}@{rows}"] = best_seconds(run)
        return seconds
    finally:
        torch.set_num_threads(previous)


def blas_from_rows(seconds: dict[str, float]) -> int:
    """The fewest probed rows from which torch's product takes over (measured_choices.takeover_rows)."""
    switch = takeover_rows({r: seconds[f"selfhost@{r}"] for r in PROBE_ROWS},
                           {r: seconds[f"torch@{r}"] for r in PROBE_ROWS}, MIN_GAIN)
    return NEVER if switch is None else switch


def choose_blas_from_rows(in_features: int, out_features: int, threads: int) -> tuple[int, bool]:
    """(switch, whether it came from the cache) for products of this shape on `threads` threads."""
    shape = (min(in_features, PROBE_MAX_IN), min(out_features, PROBE_MAX_OUT))
    seconds, cached = CHOICES.seconds((f"{shape[0]}x{shape[1]}", f"threads={threads}"), 2 * len(PROBE_ROWS),
                                      lambda: measure(*shape, threads))
    return blas_from_rows(seconds), cached


def use_measured_fp32_products(model: nn.Module, in_features: int, out_features: int) -> int:
    """Give every fp32 Linear outside a mixture's experts the measured switch; returns it."""
    if not linear.USE_GEMM:  # no selfhost product to switch from
        return NEVER
    switch, cached = choose_blas_from_rows(in_features, out_features, torch.get_num_threads())
    experts = expert_module_ids(model)
    for module in model.modules():
        if type(module) is Linear and id(module) not in experts:
            module.blas_from_rows = switch
    where = "never" if switch == NEVER else f"from {switch} rows"
    log.debug("fp32 products: selfhost's AVX-512 GEMM, torch's (MKL) %s (%s)", where,
             "cached measurement" if cached else "measured now")
    return switch
