"""The CPU fp32 inference paths of Linear against F.linear: C products (AVX-512, AVX2), numpy BLAS, threads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfhost.layers import linear
from selfhost.layers.linear import Linear


def available_paths():
    paths = ["numpy"]
    if linear._matvec_cpu is not None and linear._matvec_cpu.available():
        paths.append("matvec")
    if linear._gemm_cpu is not None and linear._gemm_cpu.available():
        paths.append("gemm")
    return paths


@pytest.mark.parametrize("path", available_paths())
@pytest.mark.parametrize("rows", [1, 3, 31, 32, 100, 300])
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (576, 960), (37, 53), (1536, 576)])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_product_matches_f_linear(path, rows, in_features, out_features, threads, monkeypatch):
    monkeypatch.setattr(linear, "USE_GEMM", path == "gemm")
    monkeypatch.setattr(linear, "USE_MATVEC", path == "matvec")
    gen = torch.Generator().manual_seed(rows * 7 + in_features)
    layer = Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    x = torch.randn(rows, in_features, generator=gen)
    with torch.inference_mode():
        got = layer(x, threads)
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
        assert linear._gemm_cpu is not None, "run `pip install -e .` to build the C kernels"
        assert norm._norm_cpu is not None, "run `pip install -e .` to build the C kernels"


needs_gemm = pytest.mark.skipif(
    linear._gemm_cpu is None or not linear._gemm_cpu.available(), reason="needs the AVX-512 kernel and an AVX-512 CPU"
)


@needs_gemm
@pytest.mark.parametrize("few_rows_max", [0, 10_000], ids=["packed", "dot"])
@pytest.mark.parametrize("rows,out_features,in_features", [
    (1, 1, 1), (5, 3, 17), (12, 32, 256), (13, 33, 257), (25, 70, 600), (37, 64, 1539), (300, 129, 576),
])
def test_both_gemm_algorithms_match_float64(few_rows_max, rows, out_features, in_features):
    # Shapes cross every edge: rows past the 12- and 6-row blocks, columns past the 32-wide panels
    # and 4-row tiles, K past the 256-wide slices and not a multiple of 16.
    rng = np.random.default_rng(rows + out_features + in_features)
    x = rng.standard_normal((rows, in_features), dtype=np.float32)
    w = rng.standard_normal((out_features, in_features), dtype=np.float32)
    y = np.full((rows, out_features), np.nan, dtype=np.float32)
    linear._gemm_cpu.gemm(x.ctypes.data, w.ctypes.data, y.ctypes.data, rows, out_features, in_features, 2,
                          few_rows_max)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(y - expected).max() <= 1e-5 * np.sqrt(in_features) * max(1.0, np.abs(expected).max())


@needs_gemm
def test_gemm_with_empty_inner_dimension_writes_zeros():
    y = np.full((3, 4), np.nan, dtype=np.float32)
    x, w = np.empty((3, 0), np.float32), np.empty((4, 0), np.float32)
    linear._gemm_cpu.gemm(x.ctypes.data, w.ctypes.data, y.ctypes.data, 3, 4, 0, 1)
    assert (y == 0).all()


@needs_gemm
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 40, 4096])
def test_gemm_argmax_is_numpys_argmax_of_the_product(out_features):
    """Each row's first largest value (integer sums: many exact ties), the first NaN where a column holds one
    (in the 16-wide body or the tail), and rows of -inf: the index numpy's argmax gives, with y written too."""
    rng = np.random.default_rng(out_features)
    rows, in_features = 7, 24
    x = np.abs(rng.integers(0, 3, (rows, in_features))).astype(np.float32) + 1  # positive: signs stay put
    cases = {"ties": None, "nan": out_features - 1, "nan_early": out_features // 3, "ninf": -1}
    for case, column in cases.items():
        w = rng.integers(0, 2, (out_features, in_features)).astype(np.float32)
        if case.startswith("nan"):
            w[column, 5] = np.nan
        if case == "ninf":
            w[:] = -np.inf
        y = np.zeros((rows, out_features), dtype=np.float32)
        tokens = linear._gemm_cpu.gemm_argmax(x.ctypes.data, w.ctypes.data, y.ctypes.data, rows, out_features,
                                              in_features, 2)
        expected = x.astype(np.float64) @ w.T.astype(np.float64)
        assert np.array_equal(y, expected.astype(np.float32), equal_nan=True), case
        assert tokens == y.argmax(axis=-1).tolist(), case
