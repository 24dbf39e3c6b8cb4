"""RMSNorm's CPU paths (C kernel, torch) against the reference formula, with and without Gemma's offset."""

import pytest
import torch

from selfhost.layers import norm
from selfhost.layers.norm import RMSNorm


def reference(x, weight, eps, offset):
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (weight.double() + offset)).float()


@pytest.mark.parametrize("dim", [8, 37, 576, 2048])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("c_kernel", [True, False])
def test_rms_norm_matches_the_formula(dim, offset, c_kernel, monkeypatch):
    if c_kernel and norm._norm_cpu is None:
        pytest.skip("no C compiler: kernel not built")
    if not c_kernel:
        monkeypatch.setattr(norm, "_norm_cpu", None)
    gen = torch.Generator().manual_seed(dim)
    layer = RMSNorm(dim, 1e-6, weight_offset=offset)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, generator=gen))
    x = torch.randn(3, 5, dim, generator=gen) * 4
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == x.shape
    assert (got - reference(x, layer.weight, 1e-6, offset)).abs().max() < 1e-5


def test_non_contiguous_input_takes_the_torch_path():
    layer = RMSNorm(16, 1e-6)
    x = torch.randn(4, 32)[:, ::2]
    with torch.inference_mode():
        assert torch.allclose(layer(x), reference(x, layer.weight, 1e-6, 0.0), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c_kernel", [True, False])
def test_add_forward_is_the_sum_and_its_norm_and_leaves_x_alone(threads, c_kernel, monkeypatch):
    if c_kernel and norm._norm_cpu is None:
        pytest.skip("no C compiler: kernel not built")
    if not c_kernel:
        monkeypatch.setattr(norm, "_norm_cpu", None)
    gen = torch.Generator().manual_seed(threads)
    layer = RMSNorm(576, 1e-6, weight_offset=1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(576, generator=gen))
    x, residual = torch.randn(45, 576, generator=gen) * 3, torch.randn(45, 576, generator=gen)  # rows past 16-row chunks
    before = x.clone()
    with torch.inference_mode():
        summed, out = layer.add_forward(x, residual, threads)
        threaded = layer(x + residual, threads)
    assert torch.equal(x, before)  # callers (importance scores) still hold the layer's input
    assert torch.equal(summed, before + residual)
    assert (out - reference(before + residual, layer.weight, 1e-6, 1.0)).abs().max() < 1e-5
    assert torch.equal(out, threaded)  # rows split over threads: the same bits as one pass
