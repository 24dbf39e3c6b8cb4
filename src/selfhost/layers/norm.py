"""RMSNorm, with the (1 + w) weight convention Gemma checkpoints use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        # Gemma stores w and scales by (1 + w); Llama-style stores the scale itself.
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused kernel; identical to the reference's steps when nothing needs casting.
            weight = self.weight + self.weight_offset if self.weight_offset else self.weight
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # Half precision: normalise in fp32 and round where the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (self.weight.float() + self.weight_offset)).to(x.dtype)
        return self.weight * x32.to(x.dtype)
