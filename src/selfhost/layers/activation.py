"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def gated(act_name: str):
    act = ACTIVATIONS[act_name]

    def forward(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return act(gate) * up
        return act(gate).mul_(up)  # one (T, intermediate) temporary instead of two

    return forward
