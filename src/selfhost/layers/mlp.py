"""The gated MLP (SwiGLU, GeGLU): down(act(gate(x)) * up(x)), with gate and up packed into one product."""

from __future__ import annotations

import torch
from torch import nn

from selfhost.layers.activation import gated
from selfhost.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = gated(activation, swiglu_alpha, swiglu_limit)
        self.plain_swiglu = activation == "silu"

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        # The whole MLP in one call where the gate|up layer has one (bf16 tiles, int8) and its weights,
        # rows and the down layer allow it; each weight format owns its fused kernel.
        fused = getattr(self.gate_up_proj, "swiglu", None) if self.plain_swiglu else None
        if fused is not None and (out := fused(self.down_proj, x, num_threads)) is not None:
            return out
        return self.down_proj.forward(self.act(self.gate_up_proj.forward(x, num_threads), num_threads), num_threads)
