"""int8 layers on AMX-INT8 tiles (quant/_int8_tiles_amx.h): each activation row quantized with one scale,
exact int32 sums, against the same arithmetic in float64; Int8Linear takes it from its switch."""

import sys

import pytest
import torch

from selfhost.quant import int8_products
from selfhost.quant.int8 import Int8Linear, _int8_cpu, quantize_int8

needs_amx = pytest.mark.skipif(not int8_products.amx_available(), reason="the AMX-INT8 kernel needs a CPU with AMX")


def per_row_w8a8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's definition: x's rows to int8 at amax / 127 (round half to even), integer sums, scales."""
    amax = x.abs().amax(1, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))  # fp32, as the kernel
    xq = torch.round(x * inverse).clamp(-128, 127)
    y = (xq.double() @ q.double().T) * (amax.double() / 127) * scales.double()
    return y + (0 if bias is None else bias.double())


def amx(x, q, scales, bias, threads, packed=None):
    rows, (n, k) = x.shape[0], q.shape
    out = torch.full((rows, n), float("nan"))
    _int8_cpu.linear_amx(x.data_ptr(), q.data_ptr(), scales.data_ptr(), 0 if bias is None else bias.data_ptr(),
                         out.data_ptr(), rows, n, k, threads, 0 if packed is None else packed.data_ptr())
    return out


def pack(q):
    n, k = q.shape
    packed = torch.full((_int8_cpu.amx_packed_bytes(n, k),), 77, dtype=torch.int8)  # no zeros to hide behind
    _int8_cpu.pack_amx(q.data_ptr(), packed.data_ptr(), n, k)
    return packed


@needs_amx
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (128, 70), (256, 5), (192, 33), (96, 40), (160, 17),
                                                      (32, 64)])  # 96, 160, 32: a last half tile
@pytest.mark.parametrize("bias", [False, True])
def test_the_product_is_per_row_w8a8(rows, in_features, out_features, bias):
    gen = torch.Generator().manual_seed(rows * out_features)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=gen))
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen) * torch.linspace(0.1, 10, rows)[:, None]  # rows' own scales
    if rows > 2:
        x[1] = 0  # a zero row: scale 0, outputs the bias
    expected = per_row_w8a8(x, q, scales, b)
    packed = pack(q)
    for threads in (1, 2):
        out = amx(x, q, scales, b, threads)
        assert not out.isnan().any()  # every output written, nothing past N
        assert ((out.double() - expected).abs() <= 1e-5 * expected.abs().max() + 1e-6).all()
        # tiles packed once give the bits the per-call packing gives
        assert torch.equal(amx(x, q, scales, b, threads, packed), out)


@needs_amx
def test_bad_widths_are_refused():
    q, scales = quantize_int8(torch.randn(8, 80))
    with pytest.raises(ValueError, match="multiple of 32"):
        amx(torch.randn(4, 80), q, scales, None, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        _int8_cpu.amx_packed_bytes(8, 80)
    with pytest.raises(ValueError, match="multiple of 32"):
        _int8_cpu.pack_amx(q.data_ptr(), q.data_ptr(), 8, 80)


@needs_amx
def test_packed_tiles_cover_every_strip():
    """Strips of 32 outputs, inputs padded to 64: the size the kernel steps through; padding is zeros."""
    assert _int8_cpu.amx_packed_bytes(40, 96) == 64 * 128
    assert _int8_cpu.amx_packed_bytes(32, 64) == 32 * 64
    q, _ = quantize_int8(torch.randn(33, 96))
    packed = pack(q)
    assert packed.numel() == 64 * 128
    assert int((packed != 0).sum()) <= q.numel() and int((packed != 0).sum()) == int((q != 0).sum())


@needs_amx
@torch.inference_mode()
def test_an_int8_layer_takes_the_amx_kernel_from_its_switch_where_its_width_allows():
    gen = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(128, 40))
    layer.prepare("avx2", widened_from_rows=sys.maxsize, vnni_from_rows=2, amx_from_rows=8)
    assert layer.amx_packed is not None and torch.equal(layer.amx_packed, pack(layer.qweight))
    for rows, product in ((7, _int8_cpu.linear_vnni), (8, _int8_cpu.linear_amx), (50, _int8_cpu.linear_amx)):
        x = torch.randn(rows, 128, generator=gen)
        out = torch.empty(rows, 40)
        product(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(), layer.bias.data_ptr(), out.data_ptr(),
                rows, 40, 128, 2)
        assert torch.equal(layer(x, 2), out)
    odd = Int8Linear.from_float(torch.nn.Linear(40, 16))  # 40 inputs, not whole blocks of 32: the dots
    odd.prepare("avx2", widened_from_rows=sys.maxsize, vnni_from_rows=2, amx_from_rows=8)
    assert odd.amx_from_rows == odd.vnni_from_rows == sys.maxsize and odd.amx_packed is None
    x = torch.randn(20, 40, generator=gen)
    out = torch.empty(20, 16)
    _int8_cpu.linear(x.data_ptr(), odd.qweight.data_ptr(), odd.scales.data_ptr(), odd.bias.data_ptr(), out.data_ptr(),
                     20, 16, 40, 2)
    assert torch.equal(odd(x, 2), out)
