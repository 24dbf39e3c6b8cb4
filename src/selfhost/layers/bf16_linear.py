"""A linear layer whose weights are stored in bf16 while activations stay fp32.

A decode step on CPU streams every weight once, so bf16 weights (half the bytes
of fp32) make it up to twice as fast; a prompt or a large batch is bound by
compute, and CPUs with AMX or AVX512-BF16 multiply bf16 several times faster
than fp32. Both are had without giving up fp32 activations (norms, attention,
residual sums and the KV cache stay fp32, so outputs stay close to the fp32 run).

Two weight layouts, chosen once per process from what the CPU has:
- "tiles" (CPUs with AVX-512): the weights are reordered at load into the blocks AMX
  multiplies (`_bf16_tiles_cpu.c`). Few rows: AVX-512 FMAs on the exact fp32
  activations, each weight widened in registers. More rows: AMX tiles on the
  activations rounded to bf16, with fp32 sums written out as fp32; on a CPU without
  AMX (or whose OS does not grant it), the few-row kernel at every size: it runs near
  the fp32 FMA peak, twice what torch's bf16 matmul reached there.
- "rows" (other CPUs): W as it is, (out, in). Few rows: selfhost's C kernel
  (`_gemm_cpu.gemm_bf16w`, AVX-512), exact activations. More rows: torch's bf16
  matmul (oneDNN), which rounds the activations and each output to bf16 (torch
  has no fp32-output bf16 product on CPU).
Where the switch between few and more rows lies depends on the CPU, so it is
measured (`measure_few_rows_max`) when a model is converted, not written down here.
The only rounding is the weights' (and, past the switch, the activations' and,
in "rows", the outputs') to bf16: an 8-bit mantissa, a relative error of at most
2^-9 per value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfhost.timing import best_seconds

try:
    from selfhost.layers import _gemm_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _gemm_cpu = None
try:
    from selfhost.layers import _bf16_tiles_cpu
except ImportError:
    _bf16_tiles_cpu = None

# Rows tried when measuring where torch's bf16 matmul overtakes the C kernel.
_PROBE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def c_kernel_available() -> bool:
    """The "rows" layout's few-row kernel (AVX-512)."""
    return _gemm_cpu is not None and _gemm_cpu.available()


def tiles_available() -> bool:
    """The "tiles" layout's products: AVX-512 for few rows, and for many rows AMX where granted."""
    return _bf16_tiles_cpu is not None and _bf16_tiles_cpu.available()


def amx_available() -> bool:
    """The "tiles" layout's many rows go to AMX (which rounds the activations to bf16)."""
    return _bf16_tiles_cpu is not None and _bf16_tiles_cpu.amx_available()


def best_layout() -> str:
    return "tiles" if tiles_available() else "rows"


class Bf16Linear(nn.Module):
    """y = x @ W^T + b with W held in bf16; x and y in fp32 (other dtypes go through F.linear).

    `layout`: "tiles" or "rows" (see the module's docstring); "tiles" holds `weight`
    as a flat, padded, reordered buffer (`dense_weight()` gives W back as (out, in)).
    `few_rows_max`: up to this many rows the few-row kernel runs, above it the
    many-row product (0: always the latter). Set by the converter from a measurement.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, few_rows_max: int = 0,
                 layout: str = "rows", device=None):
        super().__init__()
        if layout not in ("rows", "tiles"):
            raise ValueError(f"unknown bf16 weight layout {layout!r}")
        if layout == "tiles" and not tiles_available():
            raise ValueError("the 'tiles' bf16 layout needs a CPU with AVX-512 (and selfhost's compiled kernels)")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        shape = ((_bf16_tiles_cpu.packed_size(out_features, in_features),) if layout == "tiles"
                 else (out_features, in_features))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.bfloat16, device=device), requires_grad=False)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        )
        few_rows_kernel = tiles_available() if layout == "tiles" else c_kernel_available()
        self.few_rows_max = few_rows_max if few_rows_kernel else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, few_rows_max: int = 0, layout: str = "rows") -> Bf16Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, few_rows_max, layout,
                     linear.weight.device)
        with torch.no_grad():
            rounded = linear.weight.to(torch.bfloat16).contiguous()  # round to nearest even
            if layout == "tiles":
                _bf16_tiles_cpu.pack(rounded.data_ptr(), module.weight.data_ptr(), linear.out_features,
                                     linear.in_features)
            else:
                module.weight.copy_(rounded)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        """W as (out_features, in_features) bf16, whatever the layout (a copy for "tiles")."""
        if self.layout == "rows":
            return self.weight
        # Blocks of 16 outputs x 32 inputs; block row i holds the pairs (W[n][2i], W[n][2i+1]) for 16 n.
        out_blocks = self.weight.numel() // (16 * 32 * -(-self.in_features // 32))
        blocks = self.weight.view(out_blocks, -1, 16, 16, 2)  # (n block, k block, i, n, pair)
        dense = blocks.permute(0, 3, 1, 2, 4).reshape(out_blocks * 16, -1)
        return dense[: self.out_features, : self.in_features].contiguous()

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """num_threads: threads selfhost's kernels use (the engine step's choice); also torch's, for its matmul."""
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        rows = x.numel() // self.in_features
        if x.dtype != torch.float32 or x.device.type != "cpu":
            out = F.linear(x, self.dense_weight().to(x.dtype))
        elif self.layout == "tiles":
            x = x.contiguous()
            out = torch.empty(*x.shape[:-1], self.out_features)
            product = _bf16_tiles_cpu.linear_few_rows if rows <= self.few_rows_max else _bf16_tiles_cpu.linear
            product(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                    rows, self.out_features, self.in_features, num_threads)
            return out
        elif rows <= self.few_rows_max:
            x = x.contiguous()
            out = torch.empty(*x.shape[:-1], self.out_features)
            _gemm_cpu.gemm_bf16w(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, self.out_features,
                                 self.in_features, num_threads)
        else:
            out = _on_threads(num_threads, lambda: F.linear(x.to(torch.bfloat16), weight).to(x.dtype))
        return out if bias is None else out.add_(bias.to(out.dtype))

    def swiglu(self, down: nn.Module, x: torch.Tensor, num_threads: int) -> torch.Tensor | None:
        """This gate|up layer's MLP in one call (GatedMLP), or None: see `swiglu_tiles`."""
        return swiglu_tiles(self, down, x, num_threads)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"few_rows_max={self.few_rows_max}")


def swiglu_tiles(gate_up: nn.Module, down: nn.Module, x: torch.Tensor, num_threads: int) -> torch.Tensor | None:
    """down(silu(gate(x)) * up(x)) in one AMX call (`swiglu_mlp`) where both products are "tiles"
    Bf16Linear past their few-row switch and gate|up has no bias; None elsewhere. The same bits as
    the three passes (the SwiGLU is applied as the gate|up sums leave the tiles and rounded
    straight into the down product's tiles), without writing out and reading back the
    (rows, 2 x intermediate) fp32 product: a 1024-row chunk's MLP took ~2.6x less time."""
    if not (amx_available() and type(gate_up) is Bf16Linear and type(down) is Bf16Linear
            and gate_up.layout == down.layout == "tiles"
            and gate_up._parameters["bias"] is None and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return None
    hidden, intermediate = gate_up.in_features, down.in_features
    rows = x.numel() // hidden
    if (rows <= max(gate_up.few_rows_max, down.few_rows_max) or gate_up.out_features != 2 * intermediate
            or down.out_features != hidden or hidden % 32 or intermediate % 32):
        return None
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], hidden)
    bias = down._parameters["bias"]
    _bf16_tiles_cpu.swiglu_mlp(x.data_ptr(), gate_up.weight.data_ptr(), down.weight.data_ptr(),
                               0 if bias is None else bias.data_ptr(), out.data_ptr(), rows, intermediate, hidden,
                               num_threads)
    return out


def many_rows_product(layout: str) -> str:
    """What a layout's products run on past the few-row switch, in words (logs, stats, /metrics)."""
    if layout == "rows":
        return "torch's bf16 matmul (oneDNN)"
    return "AMX tiles" if amx_available() else "the same AVX-512 kernel (no AMX)"


def _on_threads(num_threads: int, run):
    """run() with torch's intra-op threads at num_threads: a decode step keeps torch's own tiny ops
    on one thread (engine/cpu_threads.py), but this matmul is worth the step's full count."""
    previous = torch.get_num_threads()
    if previous == num_threads:
        return run()
    torch.set_num_threads(num_threads)
    try:
        return run()
    finally:
        torch.set_num_threads(previous)


def _warm_best_seconds(run) -> float:
    run()  # first call: allocation, thread start
    return best_seconds(run)


@torch.inference_mode()
def measure(in_features: int, out_features: int, layout: str) -> dict[str, float]:
    """Best-of-n seconds of the few-row kernel ("few@R") and the many-row product ("many@R") on one
    thread (the count decode steps start from), for every probed row count R."""
    layer = Bf16Linear(in_features, out_features, bias=False, few_rows_max=max(_PROBE_ROWS), layout=layout)
    layer.weight.normal_()
    many_rows_layer = Bf16Linear(in_features, out_features, bias=False, few_rows_max=0, layout=layout)
    many_rows_layer.weight = layer.weight
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {}
        for rows in _PROBE_ROWS:
            x = torch.randn(rows, in_features)
            seconds[f"few@{rows}"] = _warm_best_seconds(lambda: layer.forward(x, 1))
            seconds[f"many@{rows}"] = _warm_best_seconds(lambda: many_rows_layer.forward(x, 1))
        return seconds
    finally:
        torch.set_num_threads(threads)


def measure_few_rows_max(in_features: int, out_features: int, layout: str = "rows") -> int:
    """The most rows up to which the layout's few-row kernel beats its many-row product on a layer of
    this shape at every probed count; 0 without the few-row kernel. Measured once per CPU, shape and
    layout and cached (models/measured_choices.py): two loads of a model on one machine then run the
    same kernels, so their bf16 outputs agree (the many-row AMX product rounds activations to bf16,
    the few-row kernel does not)."""
    from selfhost.models.measured_choices import MeasuredChoices

    if not (tiles_available() if layout == "tiles" else c_kernel_available()):
        return 0
    if layout == "tiles" and not amx_available():
        return max(_PROBE_ROWS)  # the many-row product is the few-row kernel itself: nothing to measure
    seconds, _ = MeasuredChoices("bf16_products").seconds(
        (f"{in_features}x{out_features}", layout), 2 * len(_PROBE_ROWS),
        lambda: measure(in_features, out_features, layout))
    # One row (single-stream decode) only streams weights: the few-row kernel reads the same bytes
    # with exact activations, where AMX would fill 1/16 of a tile (and, on a 32000-row output head,
    # ran at half the bandwidth here). A noisy probe must not lose that.
    few_rows_max = 1 if layout == "tiles" else 0
    for rows in _PROBE_ROWS:
        if rows <= few_rows_max:
            continue
        if seconds[f"few@{rows}"] > seconds[f"many@{rows}"]:
            break
        few_rows_max = rows
    return few_rows_max
