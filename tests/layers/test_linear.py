"""The CPU fp32 inference paths of Linear against F.linear: C few-row product, numpy BLAS, threads."""

import pytest
import torch
import torch.nn.functional as F

from selfhost.layers import cpu_threads, linear
from selfhost.layers.linear import Linear


@pytest.mark.parametrize("rows", [1, 3, 31, 32, 100])
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (576, 960), (37, 53), (1536, 576)])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_product_matches_f_linear(rows, in_features, out_features, threads, monkeypatch):
    gen = torch.Generator().manual_seed(rows * 7 + in_features)
    layer = Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    x = torch.randn(rows, in_features, generator=gen)
    monkeypatch.setattr(cpu_threads, "_step_kernel_threads", threads)
    with torch.inference_mode():
        got = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_three_dimensional_input_keeps_its_shape():
    layer = Linear(16, 8, bias=False)
    x = torch.randn(2, 3, 16)
    with torch.inference_mode():
        assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-5)


def test_c_kernels_of_layers_are_built_where_a_compiler_exists():
    import shutil

    from selfhost.layers import norm

    if shutil.which("cc") or shutil.which("gcc"):
        assert linear._matvec_cpu is not None, "run `pip install -e .` to build the C kernels"
        assert norm._norm_cpu is not None, "run `pip install -e .` to build the C kernels"
