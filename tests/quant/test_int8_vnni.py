"""int8 layers with several rows on the register-blocked AVX-512 VNNI kernel (quant/_int8_rows_vnni.h): the
dots' int8 activation blocks and exact integer block sums, summed in fp32 in another order; the switch."""

import pytest
import torch

from selfhost.quant import int8_products
from selfhost.quant.int8 import _int8_cpu, avx2_available
from tests.quant.test_int8_widened import int8_layer

needs_vnni = pytest.mark.skipif(not (avx2_available() and _int8_cpu.vnni_available()),
                                reason="needs AVX-512 VNNI")


def _product(product, layer, x: torch.Tensor) -> torch.Tensor:
    rows, (out_features, in_features) = x.shape[0], layer.qweight.shape
    out = torch.empty(rows, out_features)
    product(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(),
            0 if layer.bias is None else layer.bias.data_ptr(), out.data_ptr(), rows, out_features, in_features, 2)
    return out


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 300])  # passes of 6 rows and each remainder
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (96, 53), (256, 130), (32, 5)])  # strips of 32, tails
@pytest.mark.parametrize("bias", [False, True])
def test_vnni_product_sums_the_dots_integers(rows, in_features, out_features, bias):
    """The same int8 blocks as the dots (`linear`): equal within fp32 summation order. A wrong offset
    (activations are made unsigned by + 128), block scale, strip or row would miss by the output's size."""
    layer = int8_layer(in_features, out_features, bias, seed=rows + in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    dots, vnni = _product(_int8_cpu.linear, layer, x), _product(_int8_cpu.linear_vnni, layer, x)
    torch.testing.assert_close(vnni, dots, rtol=0, atol=1e-5 * dots.abs().max().item())


@needs_vnni
def test_vnni_product_refuses_widths_off_the_blocks():
    layer = int8_layer(40, 16, False, seed=1)
    with pytest.raises(ValueError, match="multiple of 32"):
        _product(_int8_cpu.linear_vnni, layer, torch.randn(4, 40))


@needs_vnni
@torch.inference_mode()
def test_an_int8_layer_takes_the_vnni_kernel_from_its_switch():
    layer = int8_layer(64, 48, True, seed=3)
    layer.prepare("avx2", vnni_from_rows=2)
    for rows, product in ((1, _int8_cpu.linear), (2, _int8_cpu.linear_vnni), (40, _int8_cpu.linear_vnni)):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(layer(x, 2), _product(product, layer, x))
    layer.prepare("avx2", widened_from_rows=8, vnni_from_rows=2)  # the widened switch, where set, comes first
    if _int8_cpu.widened_available():
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(8))
        assert torch.equal(layer(x, 2), _product(_int8_cpu.linear_widened, layer, x))


def test_vnni_switch_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(int8_products, "vnni_available", lambda: False)
    assert int8_products.vnni_from_rows() == int8_products.NEVER
    monkeypatch.setattr(int8_products, "vnni_available", lambda: True)
    assert int8_products.vnni_from_rows() == 2
