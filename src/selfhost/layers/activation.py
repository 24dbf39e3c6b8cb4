"""Gated activations over a fused [gate | up] projection.

SwiGLU on an fp32 CPU step runs in selfhost's C kernel (`_activation_cpu.c`: one pass,
the step's threads) where it is built and the CPU has AVX-512; elsewhere two torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from selfhost.layers import _activation_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _activation_cpu = None

SILU_MUL_KERNEL = _activation_cpu is not None and _activation_cpu.available()

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def clamped_swiglu(alpha: float, limit: float):
    """gpt-oss's gated unit: gate clamped above at `limit`, up to +-limit, gate * sigmoid(alpha * gate) * (up + 1)."""

    def forward(gate_up: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)

    return forward


def gated(act_name: str, swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
    """The gated activation over [gate | up]; "clamped_swiglu" takes its alpha and limit."""
    if act_name == "clamped_swiglu":
        return clamped_swiglu(swiglu_alpha, swiglu_limit)
    act = ACTIVATIONS[act_name]
    kernel = SILU_MUL_KERNEL and act_name == "silu"

    def forward(gate_up: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """num_threads: the step's, for the C kernel."""
        if kernel and gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" and not torch.is_grad_enabled():
            gate_up = gate_up.contiguous()
            width = gate_up.shape[-1] // 2
            out = torch.empty(*gate_up.shape[:-1], width)
            _activation_cpu.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * width), width,
                                     num_threads)
            return out
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return act(gate) * up
        return act(gate).mul_(up)  # one (T, intermediate) temporary instead of two

    return forward
