"""Which product an int8 linear layer runs for how many rows (quant/_int8_cpu.c).

Three products read the stored (out, in) int8 weights:
- the dots: activations quantized in blocks of 32 (exact int32 sums per block), four weight rows at a
  time; one pass over the weights, the choice for one row (single-stream decode);
- the VNNI kernel (quant/_int8_rows_vnni.h, AVX-512 VNNI): the same int8 blocks, register-blocked over
  rows; far ahead of the dots from 2 rows (4-6x on a 32-row step);
- the widened product: the integers (exact in bf16) widened into layers/_bf16_tiles_cpu.c's layout, one
  pass over the weights per call, then its many-row bf16 product on the fp32 rows (AMX tiles where the
  CPU has them, which round the activations to bf16);
- the AMX-INT8 kernel (quant/_int8_tiles_amx.h): each activation
  row quantized with one scale (W8A8, as vLLM's CPU int8), exact int32 sums on the tiles; on a Xeon with
  AMX (2026-12-07) 1.4-2x VNNI at 32 rows and 1.6-1.9x the widened product at 1024 (3,100-3,600 GOP/s on
  two cores), 10-20% behind VNNI below 8 rows.

Where the CPU has VNNI and no AMX, VNNI takes every row count from 2 (the widened product there runs
on the AVX-512 widening kernel and lost at every count measured, 2026-12-07). With AMX the widened
product overtakes VNNI somewhere past a few dozen rows (on a Xeon with AMX, 2026-12-07: VNNI 1.7x
ahead at 32 rows, the widened product 1.3-1.5x ahead at 512 on 768x2304 and 2048x768), and without
VNNI it overtakes the dots; where, depends on the CPU and the shape, so it is measured once per CPU
on the model's MLP shape (capped) and cached (models/measured_choices.py).
"""

from __future__ import annotations

import logging
import sys

import torch

from selfhost.models.measured_choices import MeasuredChoices, takeover_rows
from selfhost.timing import best_seconds

log = logging.getLogger(__name__)

PROBE_ROWS = (8, 16, 24, 32, 48, 64)  # against the dots
VNNI_PROBE_ROWS = (32, 64, 128, 256, 512)  # the widened product against the VNNI or AMX kernel
AMX_PROBE_ROWS = (2, 4, 8, 12, 16, 24, 32, 48, 64)  # the AMX kernel against VNNI
PROBE_MAX_IN, PROBE_MAX_OUT = 1024, 4096
MIN_GAIN = 1.05
NEVER = sys.maxsize
CHOICES = MeasuredChoices("int8_products")


def widened_available() -> bool:
    from selfhost.quant.int8 import _int8_cpu, avx2_available

    return avx2_available() and _int8_cpu.widened_available()


@torch.inference_mode()
def measure(in_features: int, out_features: int, threads: int, incumbent: str = "dots",
            challenger: str = "widened") -> dict[str, float]:
    """Best-of-n seconds of the incumbent ("dots", "vnni" or "amx") and the widened product at its probe rows;
    for incumbent "vnni" with challenger "amx", of VNNI and the AMX kernel at AMX_PROBE_ROWS."""
    from selfhost.quant.int8 import _int8_cpu, quantize_int8

    generator = torch.Generator().manual_seed(0)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=generator))
    packed = None
    if "amx" in (incumbent, challenger):  # as Int8Linear runs it: tiles packed at load
        packed = torch.empty(_int8_cpu.amx_packed_bytes(out_features, in_features), dtype=torch.int8)
        _int8_cpu.pack_amx(q.data_ptr(), packed.data_ptr(), out_features, in_features)
    products = {"dots": _int8_cpu.linear, "vnni": _int8_cpu.linear_vnni,
                "amx": lambda *args: _int8_cpu.linear_amx(*args, packed.data_ptr()),
                "widened": _int8_cpu.linear_widened}
    seconds = {}
    for rows in AMX_PROBE_ROWS if challenger == "amx" else probe_rows(incumbent):
        x = torch.randn(rows, in_features, generator=generator)
        out = torch.empty(rows, out_features)
        args = (x.data_ptr(), q.data_ptr(), scales.data_ptr(), 0, out.data_ptr(), rows, out_features, in_features,
                threads)
        for name, product in ((incumbent, products[incumbent]), (challenger, products[challenger])):
            product(*args)  # warm
            seconds[f"{name}@{rows}"] = best_seconds(lambda: product(*args))
    return seconds


def probe_rows(incumbent: str) -> tuple[int, ...]:
    return PROBE_ROWS if incumbent == "dots" else VNNI_PROBE_ROWS


def widened_from_rows(in_features: int, out_features: int, threads: int) -> int:
    """Rows from which int8 layers of this shape take the widened product; NEVER where it never pays
    or cannot run (no AVX-512 tile kernels, VNNI without AMX, or an input width that is not a
    multiple of 32)."""
    from selfhost.layers import bf16_linear

    if not widened_available() or in_features % 32 or (vnni_available() and not bf16_linear.amx_available()):
        return NEVER
    incumbent = "amx" if amx_available() else "vnni" if vnni_available() else "dots"
    rows = probe_rows(incumbent)
    shape = (min(in_features, PROBE_MAX_IN) // 32 * 32, min(out_features, PROBE_MAX_OUT))
    against = "against amx (packed)" if incumbent == "amx" else f"against {incumbent}"
    seconds, cached = CHOICES.seconds((f"{shape[0]}x{shape[1]}", f"threads={threads}", against),
                                      2 * len(rows), lambda: measure(*shape, threads, incumbent))
    switch = takeover_rows({r: seconds[f"{incumbent}@{r}"] for r in rows},
                           {r: seconds[f"widened@{r}"] for r in rows}, MIN_GAIN)
    log.debug("int8 products: the widened product takes over from %s %s (%s)", incumbent,
              "never" if switch is None else f"at {switch} rows", "cached measurement" if cached else "measured now")
    return NEVER if switch is None else switch


def amx_available() -> bool:
    """The AMX-INT8 kernel (quant/_int8_tiles_amx.h) runs here."""
    from selfhost.quant.int8 import _int8_cpu, avx2_available

    return avx2_available() and _int8_cpu.amx_available()


def amx_from_rows(in_features: int, out_features: int, threads: int) -> int:
    """Rows from which int8 layers of this shape take the AMX kernel instead of VNNI: measured once per
    CPU on the model's MLP shape (capped) and cached; NEVER where it cannot run or never pays."""
    if not (amx_available() and vnni_available()) or in_features % 32:
        return NEVER
    shape = (min(in_features, PROBE_MAX_IN) // 32 * 32, min(out_features, PROBE_MAX_OUT))
    seconds, cached = CHOICES.seconds((f"{shape[0]}x{shape[1]}", f"threads={threads}", "amx (packed) against vnni"),
                                      2 * len(AMX_PROBE_ROWS), lambda: measure(*shape, threads, "vnni", "amx"))
    switch = takeover_rows({r: seconds[f"vnni@{r}"] for r in AMX_PROBE_ROWS},
                           {r: seconds[f"amx@{r}"] for r in AMX_PROBE_ROWS}, MIN_GAIN)
    log.debug("int8 products: the AMX kernel takes over from VNNI %s (%s)",
              "never" if switch is None else f"at {switch} rows", "cached measurement" if cached else "measured now")
    return NEVER if switch is None else switch


VNNI_FROM_ROWS = 2  # one row keeps the dots: packing a strip costs more than their single pass over it


def vnni_available() -> bool:
    """The register-blocked VNNI kernel (quant/_int8_rows_vnni.h) runs here."""
    from selfhost.quant.int8 import _int8_cpu, avx2_available

    return avx2_available() and _int8_cpu.vnni_available()


def vnni_from_rows() -> int:
    """Rows from which int8 layers take the VNNI kernel instead of the dots (up to the widened
    product's switch, where that is measured); NEVER where it cannot run."""
    return VNNI_FROM_ROWS if vnni_available() else NEVER
