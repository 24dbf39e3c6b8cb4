"""Quantize/dequantize round trips and the runtime modules against a dequantized fp32 reference."""

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
from selfhost.quant.int8 import Int8Embedding, Int8Linear, dequantize_int8, fbgemm_available, quantize_int8


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


KERNELS_INT8 = ["dequant"] + (["fbgemm"] if fbgemm_available() else [])
KERNELS_INT4 = ["dequant"] + (["int4pack_cpu"] if int4pack_cpu_available() else [])
# dequant is exact up to fp32 summation order; fbgemm quantizes each activation
# row to 8 bits; int4pack runs in bf16.
TOLERANCE = {"dequant": 1e-5, "fbgemm": 0.02, "int4pack_cpu": 0.01}


@pytest.mark.parametrize("kernel", KERNELS_INT8)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized_reference(kernel, bias):
    torch.manual_seed(1)
    linear = nn.Linear(256, 96, bias=bias)
    module = Int8Linear.from_float(linear)
    reference_weight = dequantize_int8(module.qweight, module.scales)
    module.prepare(kernel)
    assert module.kernel == kernel
    with torch.no_grad():
        for x in (torch.randn(1, 256), torch.randn(5, 256)):  # decode and prefill shapes
            ref = F.linear(x, reference_weight, linear.bias)
            out = module(x)
            assert out.shape == ref.shape and out.dtype == x.dtype
            assert (out - ref).abs().max() <= TOLERANCE[kernel] * ref.abs().max()


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
