"""SwiGLU's C kernel against torch's two-op reference, in float64."""

import pytest
import torch
import torch.nn.functional as F

from selfhost.layers import activation

needs_kernel = pytest.mark.skipif(not activation.SILU_MUL_KERNEL, reason="the SwiGLU kernel needs AVX-512F")


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return F.silu(gate) * up


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 33])
@pytest.mark.parametrize("width", [1, 15, 16, 17, 100, 1536])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_silu_times_up(rows, width, threads):
    gen = torch.Generator().manual_seed(rows * width)
    gate_up = torch.randn(2, rows, 2 * width, generator=gen) * 8  # far into both tails of the sigmoid
    with torch.inference_mode():
        got = activation.gated("silu")(gate_up, threads)
    expected = reference(gate_up)
    assert got.shape == (2, rows, width) and got.dtype == torch.float32
    assert ((got.double() - expected).abs() <= 1e-6 * expected.abs() + 1e-30).all()


@needs_kernel
def test_kernel_handles_extremes_like_torch():
    gate = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4, float("inf")])
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None]
    with torch.inference_mode():
        got = activation.gated("silu")(gate_up, 1)[0]
    expected = F.silu(gate)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-30)


def test_other_activations_and_training_take_torch():
    gate_up = torch.randn(3, 8, requires_grad=True)
    out = activation.gated("silu")(gate_up)
    out.sum().backward()  # autograd flows: the kernel is not used under grad
    assert gate_up.grad is not None
    with torch.inference_mode():
        gelu = activation.gated("gelu_tanh")(gate_up.detach())
    gate, up = gate_up.detach().chunk(2, dim=-1)
    assert torch.allclose(gelu, F.gelu(gate, approximate="tanh") * up)
