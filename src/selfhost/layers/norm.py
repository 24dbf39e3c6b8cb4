"""RMSNorm, with the (1 + w) weight convention Gemma checkpoints use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from selfhost.layers import _norm_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _norm_cpu = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        # Gemma stores w and scales by (1 + w); Llama-style stores the scale itself.
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def _kernel_takes(self, *tensors: torch.Tensor) -> bool:
        return (_norm_cpu is not None and not torch.is_grad_enabled()
                and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors))

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, num_threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)); in inference on CPU both come from one C pass (the
        residual add before a pre-norm, without a pass of its own). x is left as it was."""
        if not (self._kernel_takes(x, residual) and x.shape == residual.shape):
            x = x + residual
            return x, self.forward(x, num_threads)
        summed, out = torch.empty_like(x), torch.empty_like(x)
        _norm_cpu.add_rms_norm(x.data_ptr(), residual.data_ptr(), summed.data_ptr(), self._parameters["weight"].data_ptr(),
                               out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], self.eps, self.weight_offset,
                               num_threads)
        return summed, out

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        if x.dtype == torch.float32:
            weight = self._parameters["weight"]
            if self._kernel_takes(x):
                # One C pass instead of PyTorch's handful of small CPU ops (~1 us against ~9 us a row);
                # a prompt's rows split over `num_threads`.
                out = torch.empty_like(x)
                _norm_cpu.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                                   x.shape[-1], self.eps, self.weight_offset, num_threads)
                return out
            # The reference's steps, nothing to cast in fp32.
            return F.rms_norm(x, (x.shape[-1],), weight + self.weight_offset if self.weight_offset else weight, self.eps)
        # Half precision: normalise in fp32 and round where the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (self.weight.float() + self.weight_offset)).to(x.dtype)
        return self.weight * x32.to(x.dtype)
