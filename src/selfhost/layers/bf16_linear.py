"""A linear layer whose weights are stored in bf16 while activations stay fp32.

A decode step on CPU streams every weight once, so bf16 weights (half the bytes
of fp32) make it up to twice as fast; a prompt or a large batch is bound by
compute, and CPUs with AMX or AVX512-BF16 multiply bf16 several times faster
than fp32. Both are had without giving up fp32 activations (norms, attention,
residual sums and the KV cache stay fp32, so outputs stay close to the fp32 run):
- few rows: selfhost's C kernel (`_gemm_cpu.gemm_bf16w`) reads the bf16 weights
  where they lie and widens them to fp32 in registers (exact), with fp32 sums;
- more rows: the activations are rounded to bf16 and torch's bf16 matmul
  (oneDNN, which uses AMX tiles where the CPU has them) sums in fp32 and rounds
  each output to bf16 (torch has no fp32-output bf16 product on CPU).
Where the switch between the two lies depends on the CPU, so it is measured
(`measure_few_rows_max`) when a model is converted, not written down here.
The only rounding is the weights' (and, past the switch, the activations' and
the outputs') to bf16: an 8-bit mantissa, a relative error of at most 2^-9 per value.
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

# Rows tried when measuring where torch's bf16 matmul overtakes the C kernel.
_PROBE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def c_kernel_available() -> bool:
    return _gemm_cpu is not None and _gemm_cpu.available()


class Bf16Linear(nn.Module):
    """y = x @ W^T + b with W held in bf16; x and y in fp32 (other dtypes go through F.linear).

    `few_rows_max`: up to this many rows the C kernel runs, above it torch's bf16
    matmul (0: always torch). Set by the converter from a measurement.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, few_rows_max: int = 0, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.bfloat16, device=device),
                                   requires_grad=False)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        )
        self.few_rows_max = few_rows_max if c_kernel_available() else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, few_rows_max: int = 0) -> Bf16Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, few_rows_max,
                     linear.weight.device)
        with torch.no_grad():
            module.weight.copy_(linear.weight)  # round to nearest even
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """num_threads: threads the C kernel may use (the engine step's choice); torch's matmul takes torch's."""
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        rows = x.numel() // self.in_features
        if rows <= self.few_rows_max and x.dtype == torch.float32 and x.device.type == "cpu":
            x = x.contiguous()
            out = torch.empty(*x.shape[:-1], self.out_features)
            _gemm_cpu.gemm_bf16w(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, self.out_features,
                                 self.in_features, num_threads)
        else:
            out = _on_threads(num_threads, lambda: F.linear(x.to(torch.bfloat16), weight).to(x.dtype))
        return out if bias is None else out.add_(bias.to(out.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, few_rows_max={self.few_rows_max}"


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
def measure_few_rows_max(in_features: int, out_features: int) -> int:
    """The most rows for which the C kernel beats torch's bf16 matmul on a layer of this shape,
    both on one thread (the count decode steps start from); 0 without the C kernel. Takes
    well under a second."""
    if not c_kernel_available():
        return 0
    layer = Bf16Linear(in_features, out_features, bias=False, few_rows_max=max(_PROBE_ROWS))
    layer.weight.normal_()
    torch_layer = Bf16Linear(in_features, out_features, bias=False, few_rows_max=0)
    torch_layer.weight = layer.weight
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        few_rows_max = 0
        for rows in _PROBE_ROWS:
            x = torch.randn(rows, in_features)
            if _warm_best_seconds(lambda: layer.forward(x, 1)) > _warm_best_seconds(lambda: torch_layer.forward(x, 1)):
                break
            few_rows_max = rows
        return few_rows_max
    finally:
        torch.set_num_threads(threads)
