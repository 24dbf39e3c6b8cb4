"""int8 layers with many rows: the weights widened (exactly) to bf16 and run on the tile kernels'
many-row product, against the weight-only int8 product computed in float64; the measured switch."""

import json

import pytest
import torch

from selfhost.layers.bf16_linear import amx_available
from selfhost.quant import int8_products
from selfhost.quant.int8 import Int8Linear, _int8_cpu, quantize_int8
from selfhost.quant.int8_products import NEVER, PROBE_ROWS, widened_available, widened_from_rows

needs_widened = pytest.mark.skipif(not widened_available(), reason="needs AVX-512 and the bf16 tile kernels")


def int8_layer(in_features: int, out_features: int, bias: bool, seed: int) -> Int8Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return Int8Linear.from_float(linear)


@needs_widened
@pytest.mark.parametrize("rows", [1, 17, 33, 300])
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (96, 53), (256, 130), (32, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_widened_product_is_weight_only_int8(rows, in_features, out_features, bias):
    layer = int8_layer(in_features, out_features, bias, seed=rows + in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    out = torch.empty(rows, out_features)
    _int8_cpu.linear_widened(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(),
                             0 if layer.bias is None else layer.bias.data_ptr(), out.data_ptr(), rows, out_features,
                             in_features, 2)
    # exact weights; the activations exact without AMX, rounded to bf16 on its tiles
    xs = x.bfloat16().float() if amx_available() else x
    expected = xs.double() @ (layer.qweight.double() * layer.scales.double()[:, None]).T
    if bias:
        expected += layer.bias.double()
    assert (out.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@needs_widened
def test_widened_product_refuses_widths_off_the_packing():
    layer = int8_layer(40, 16, False, seed=1)
    x, out = torch.randn(4, 40), torch.empty(4, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        _int8_cpu.linear_widened(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(), 0, out.data_ptr(),
                                 4, 16, 40, 1)


@needs_widened
@torch.inference_mode()
def test_an_int8_layer_takes_the_widened_product_from_its_switch():
    layer = int8_layer(64, 48, True, seed=3)
    layer.prepare("avx2", widened_from_rows=8)
    dots, widened = (torch.empty(n, 48) for n in (7, 8))
    for rows, out, product in ((7, dots, _int8_cpu.linear), (8, widened, _int8_cpu.linear_widened)):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        product(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(), layer.bias.data_ptr(),
                out.data_ptr(), rows, 48, 64, 2)
        assert torch.equal(layer(x, 2), out)
    odd = int8_layer(40, 16, False, seed=4)
    odd.prepare("avx2", widened_from_rows=1)  # 40 inputs: the widened product cannot take it; the dots do
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(5))
    expected = x @ (odd.qweight.float() * odd.scales[:, None]).T
    assert (odd(x, 1) - expected).abs().max() < 0.02 * expected.abs().max()  # the dots' int8 activations


def test_the_switch_is_measured_once_per_cpu_and_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(int8_products, "widened_available", lambda: True)
    monkeypatch.setattr(int8_products, "vnni_available", lambda: False)  # against the dots
    monkeypatch.setattr(int8_products, "amx_available", lambda: False)
    calls = []
    faster_from_24 = {**{f"dots@{r}": 1.0 for r in PROBE_ROWS}, **{f"widened@{r}": 2.0 if r < 24 else 0.5
                                                                   for r in PROBE_ROWS}}
    monkeypatch.setattr(int8_products, "measure", lambda *args: calls.append(args) or faster_from_24)
    assert widened_from_rows(64, 128, 2) == 24 and widened_from_rows(64, 128, 2) == 24
    assert calls == [(64, 128, 2, "dots")]
    assert widened_from_rows(40, 128, 2) == NEVER  # not a multiple of 32: never measured
    assert len(json.loads((tmp_path / "int8_products.json").read_text())) == 1


def test_with_vnni_the_switch_is_measured_against_it_on_amx_and_never_taken_without(monkeypatch, tmp_path):
    from selfhost.layers import bf16_linear

    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(int8_products, "widened_available", lambda: True)
    monkeypatch.setattr(int8_products, "vnni_available", lambda: True)
    monkeypatch.setattr(int8_products, "amx_available", lambda: False)
    calls = []
    rows = int8_products.VNNI_PROBE_ROWS
    faster_from_256 = {**{f"vnni@{r}": 1.0 for r in rows}, **{f"widened@{r}": 2.0 if r < 256 else 0.5 for r in rows}}
    monkeypatch.setattr(int8_products, "measure", lambda *args: calls.append(args) or faster_from_256)
    monkeypatch.setattr(bf16_linear, "amx_available", lambda: False)
    assert widened_from_rows(64, 128, 2) == NEVER and calls == []  # VNNI without AMX: never measured
    monkeypatch.setattr(bf16_linear, "amx_available", lambda: True)
    assert widened_from_rows(64, 128, 2) == 256 and widened_from_rows(64, 128, 2) == 256
    assert calls == [(64, 128, 2, "vnni")]
    # with the AMX-INT8 kernel, against it
    monkeypatch.setattr(int8_products, "amx_available", lambda: True)
    faster_from_256 = {k.replace("vnni", "amx"): v for k, v in faster_from_256.items()}
    assert widened_from_rows(64, 128, 2) == 256 and calls[-1] == (64, 128, 2, "amx")


def test_the_amx_switch_is_measured_against_vnni_once_and_only_where_it_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    calls = []
    rows = int8_products.AMX_PROBE_ROWS
    faster_from_12 = {**{f"vnni@{r}": 1.0 for r in rows}, **{f"amx@{r}": 1.2 if r < 12 else 0.6 for r in rows}}
    monkeypatch.setattr(int8_products, "measure", lambda *args: calls.append(args) or faster_from_12)
    monkeypatch.setattr(int8_products, "vnni_available", lambda: True)
    monkeypatch.setattr(int8_products, "amx_available", lambda: False)
    assert int8_products.amx_from_rows(128, 256, 2) == NEVER and calls == []
    monkeypatch.setattr(int8_products, "amx_available", lambda: True)
    assert int8_products.amx_from_rows(80, 256, 2) == NEVER and calls == []  # not a multiple of 32
    assert int8_products.amx_from_rows(128, 256, 2) == 12 and int8_products.amx_from_rows(128, 256, 2) == 12
    assert calls == [(128, 256, 2, "vnni", "amx")]


@needs_widened
@pytest.mark.parametrize("incumbent,challenger", [("dots", "widened"), ("vnni", "widened"), ("amx", "widened"),
                                                  ("vnni", "amx")])
def test_the_real_measurement_times_both_products(incumbent, challenger):
    if "vnni" == incumbent and not int8_products.vnni_available():
        pytest.skip("the VNNI kernel needs AVX-512 VNNI")
    if "amx" in (incumbent, challenger) and not int8_products.amx_available():
        pytest.skip("the AMX kernel needs AMX-INT8")
    measured = int8_products.measure(64, 96, threads=1, incumbent=incumbent, challenger=challenger)
    rows = int8_products.AMX_PROBE_ROWS if challenger == "amx" else int8_products.probe_rows(incumbent)
    assert set(measured) == {f"{name}@{r}" for r in rows for name in (incumbent, challenger)}
    assert all(v > 0 for v in measured.values())
