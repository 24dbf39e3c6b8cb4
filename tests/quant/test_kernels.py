"""Quantize/dequantize round trips and the runtime modules against a dequantized fp32 reference."""

import platform
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfhost.quant.int4 import (
    Int4Embedding,
    Int4Linear,
    dequantize_int4,
    int4pack_cpu_available,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from selfhost.quant import int8
from selfhost.quant.int8 import (
    Int8Embedding,
    Int8Linear,
    avx2_available,
    dequantize_int8,
    fbgemm_available,
    quantize_int8,
)


@pytest.fixture
def weight():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    w[3, 17] = 0.9  # an outlier row must not spoil other rows
    return w


def test_int8_round_trip_error_is_at_most_half_a_step_per_row(weight):
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    err = (dequantize_int8(q, scales) - weight).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    assert err.max() / weight.abs().max() < 1 / 254 + 1e-6


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_round_trip_error_bounds(weight, group_size, symmetric):
    q, scales, zeros = quantize_int4(weight, group_size, symmetric)
    assert q.shape == (96, 128) and q.dtype == torch.uint8
    assert scales.shape == zeros.shape == (96, 256 // group_size) and scales.dtype == torch.float16
    err = (dequantize_int4(q, scales, zeros, group_size) - weight).abs()
    step = scales.float().repeat_interleave(group_size, dim=1)
    # Symmetric: the grid covers [-absmax, absmax] exactly, half a step at most.
    # Asymmetric: the rounded zero point can shift the grid by up to half a step more.
    bound = 0.5 if symmetric else 1.0
    assert (err <= bound * step + 1e-6).all()
    # The outlier only widens its own group's steps.
    assert err[4:].max() < 0.02


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


KERNELS_INT8 = ["dequant"] + (["fbgemm"] if fbgemm_available() else []) + (["avx2"] if avx2_available() else [])
KERNELS_INT4 = ["dequant"] + (["int4pack_cpu"] if int4pack_cpu_available() else [])
# dequant is exact up to fp32 summation order; fbgemm quantizes the activation
# matrix to 8 (7 without VNNI) bits; avx2 quantizes activations to 8 bits per
# block of 32 values; int4pack runs in bf16.
TOLERANCE = {"dequant": 1e-5, "fbgemm": 0.02, "avx2": 0.02, "int4pack_cpu": 0.01}


@pytest.mark.parametrize("kernel", KERNELS_INT8)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "in_features,out_features",
    [(256, 96), (250, 97), (31, 5)],  # whole blocks and tiles; a partial last block and tile; less than one of each
)
def test_int8_linear_matches_dequantized_reference(kernel, bias, in_features, out_features):
    torch.manual_seed(1)
    linear = nn.Linear(in_features, out_features, bias=bias)
    module = Int8Linear.from_float(linear)
    reference_weight = dequantize_int8(module.qweight, module.scales)
    module.prepare(kernel)
    assert module.kernel == kernel
    with torch.no_grad():
        # decode, prompt, and enough rows for the avx2 kernel to use several threads
        for x in (torch.randn(1, in_features), torch.randn(5, in_features), torch.randn(2, 40, in_features)):
            ref = F.linear(x, reference_weight, linear.bias)
            for num_threads in (1, 2):
                out = module(x, num_threads)
                assert out.shape == ref.shape and out.dtype == x.dtype
                assert (out - ref).abs().max() <= TOLERANCE[kernel] * ref.abs().max()


def _block_quantized(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What the avx2 kernel multiplies: each row in blocks of 32, rounded to int8 steps of absmax / 127."""
    pad = -x.shape[-1] % block
    blocks = F.pad(x, (0, pad)).unflatten(-1, (-1, block))
    step = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(step > 0, torch.round(blocks / step), 0.0)
    return (q * step).flatten(-2)[..., : x.shape[-1]]


@pytest.mark.skipif(not avx2_available(), reason="the avx2 kernel cannot run here")
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (250, 97), (31, 5)])
def test_avx2_kernel_is_exact_on_block_quantized_activations(in_features, out_features):
    # Integer sums are exact, so the only error is the activations' rounding: pin that down.
    torch.manual_seed(4)
    module = Int8Linear.from_float(nn.Linear(in_features, out_features))
    reference_weight = dequantize_int8(module.qweight, module.scales).double()
    module.prepare("avx2")
    with torch.no_grad():
        for x in (torch.randn(1, in_features) * 3, torch.randn(37, in_features)):
            ref = F.linear(_block_quantized(x).double(), reference_weight, module.bias.double())
            assert (module(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="the extension targets x86-64")
def test_avx2_extension_is_built_on_x86_64_linux():
    # It is optional at install time, so a broken build would otherwise only show as slower decoding.
    assert int8._int8_cpu is not None, "selfhost.quant._int8_cpu is missing: `pip install -e .` compiles it"


def test_int8_kernel_falls_back_without_the_extension(monkeypatch):
    monkeypatch.setattr(int8, "_int8_cpu", None)
    int8.avx2_available.cache_clear()
    try:
        module = Int8Linear.from_float(nn.Linear(64, 32))
        module.prepare()
        assert module.kernel == ("fbgemm" if fbgemm_available() else "dequant")
    finally:
        int8.avx2_available.cache_clear()


@pytest.mark.parametrize("kernel", KERNELS_INT4)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_linear_matches_dequantized_reference(kernel, symmetric):
    torch.manual_seed(2)
    linear = nn.Linear(256, 96, bias=True)
    module = Int4Linear.from_float(linear, 64, symmetric)
    reference_weight = dequantize_int4(module.qweight, module.scales, module.zeros, 64)
    module.prepare(kernel)
    assert module.kernel == kernel
    with torch.no_grad():
        for x in (torch.randn(1, 256), torch.randn(5, 256)):
            ref = F.linear(x, reference_weight, linear.bias)
            assert (module(x) - ref).abs().max() <= TOLERANCE[kernel] * ref.abs().max()


def test_int4pack_kernel_is_skipped_where_it_cannot_run():
    module = Int4Linear.from_float(nn.Linear(64, 40), 32, False)  # 40 rows: not a multiple of 16
    module.prepare()
    assert module.kernel == "dequant"


def test_embeddings_return_dequantized_rows():
    torch.manual_seed(3)
    emb = nn.Embedding(50, 64)
    ids = torch.tensor([0, 7, 49, 7])
    q8 = Int8Embedding.from_float(emb)
    assert torch.allclose(q8(ids), dequantize_int8(q8.qweight, q8.scales)[ids])
    q4 = Int4Embedding.from_float(emb, 32, False)
    assert torch.allclose(q4(ids), dequantize_int4(q4.qweight, q4.scales, q4.zeros, 32)[ids])
    assert (q4(ids) - emb.weight[ids]).abs().max() < 0.5
