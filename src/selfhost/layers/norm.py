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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            weight = self._parameters["weight"]
            if _norm_cpu is not None and x.device.type == "cpu" and x.is_contiguous() and not torch.is_grad_enabled():
                # One C pass instead of PyTorch's handful of small CPU ops (~1 us against ~9 us a row).
                out = torch.empty_like(x)
                _norm_cpu.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                                   x.shape[-1], self.eps, self.weight_offset)
                return out
            # The reference's steps, nothing to cast in fp32.
            return F.rms_norm(x, (x.shape[-1],), weight + self.weight_offset if self.weight_offset else weight, self.eps)
        # Half precision: normalise in fp32 and round where the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (self.weight.float() + self.weight_offset)).to(x.dtype)
        return self.weight * x32.to(x.dtype)
