"""An int8 SwiGLU MLP in one call (`swiglu_int8`: both weights widened, the MLP on AMX tiles; or on
AMX-INT8, the activation applied as the gate|up sums leave the tiles) against the separate calls it
replaces, bit for bit."""

import sys

import pytest
import torch

from selfhost.layers.mlp import GatedMLP
from selfhost.quant import int8_products
from selfhost.quant.int8 import Int8Linear, _int8_cpu, avx2_available, swiglu_int8

needs_fused = pytest.mark.skipif(not (avx2_available() and _int8_cpu.swiglu_available()),
                                 reason="the one-call MLP needs AMX and the bf16 tile kernels")


def int8_mlp(hidden: int, intermediate: int, bias: bool, seed: int, widened_from_rows: int = 8) -> GatedMLP:
    torch.manual_seed(seed)
    mlp = GatedMLP(hidden, intermediate, "silu", bias=False)
    with torch.no_grad():
        for linear in (mlp.gate_up_proj, mlp.down_proj):
            linear.weight.normal_(0, 0.2)
    mlp.gate_up_proj = Int8Linear.from_float(mlp.gate_up_proj)
    down = torch.nn.Linear(intermediate, hidden, bias=bias)
    with torch.no_grad():
        down.weight.copy_(mlp.down_proj.weight)
        if bias:
            down.bias.normal_()
    mlp.down_proj = Int8Linear.from_float(down)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.prepare("avx2", widened_from_rows=widened_from_rows, vnni_from_rows=2)
    return mlp


def separate_calls(mlp: GatedMLP, x: torch.Tensor, threads: int) -> torch.Tensor:
    return mlp.down_proj(mlp.act(mlp.gate_up_proj(x, threads), threads), threads)


@needs_fused
@torch.inference_mode()
@pytest.mark.parametrize("rows", [8, 31, 200])
@pytest.mark.parametrize("hidden,intermediate", [(64, 96), (96, 160)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_call_equals_the_separate_calls_bit_for_bit(rows, hidden, intermediate, bias):
    mlp = int8_mlp(hidden, intermediate, bias, seed=rows + hidden)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
    for threads in (1, 2):
        fused = swiglu_int8(mlp.gate_up_proj, mlp.down_proj, x, threads)
        assert fused is not None and torch.equal(fused, separate_calls(mlp, x, threads))
        assert torch.equal(mlp(x, threads), fused)  # GatedMLP takes it


@needs_fused
@torch.inference_mode()
def test_the_one_call_only_where_the_separate_calls_would_widen(monkeypatch):
    mlp = int8_mlp(64, 96, bias=False, seed=1, widened_from_rows=32)
    x = torch.randn(31, 64)
    assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, x, 2) is None  # below the switch: VNNI, separately
    assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, torch.randn(32, 64), 2) is not None
    calls = []
    monkeypatch.setattr(_int8_cpu, "swiglu_widened", lambda *args: calls.append(args))
    mlp(x, 2)
    assert calls == []
    with torch.enable_grad():  # training keeps torch's autograd path
        assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, torch.randn(40, 64), 2) is None


def test_nothing_but_int8_layers_with_their_kernel_take_it():
    mlp = GatedMLP(64, 96, "silu", bias=False)
    with torch.inference_mode():
        assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, torch.randn(40, 64), 2) is None  # fp32 layers


needs_amx = pytest.mark.skipif(not int8_products.amx_available(), reason="the AMX-INT8 kernel needs a CPU with AMX")


def amx_mlp(hidden: int, intermediate: int, bias: bool, seed: int, amx_from_rows: int = 2) -> GatedMLP:
    """Both layers on the AMX-INT8 kernel from `amx_from_rows` rows (tiles packed), never widened."""
    mlp = int8_mlp(hidden, intermediate, bias, seed, widened_from_rows=sys.maxsize)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.prepare("avx2", widened_from_rows=sys.maxsize, vnni_from_rows=2, amx_from_rows=amx_from_rows)
    return mlp


@needs_amx
@torch.inference_mode()
@pytest.mark.parametrize("rows", [2, 17, 33, 200])
@pytest.mark.parametrize("hidden,intermediate", [(64, 96), (96, 160), (128, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_on_amx_the_activation_leaves_the_tiles_with_the_separate_calls_bits(rows, hidden, intermediate, bias):
    mlp = amx_mlp(hidden, intermediate, bias, seed=rows + hidden)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows)) * 3
    for threads in (1, 2):
        fused = swiglu_int8(mlp.gate_up_proj, mlp.down_proj, x, threads)
        assert fused is not None and torch.equal(fused, separate_calls(mlp, x, threads))
        assert torch.equal(mlp(x, threads), fused)


@needs_amx
@torch.inference_mode()
def test_on_amx_the_one_call_only_past_both_switches(monkeypatch):
    mlp = amx_mlp(64, 96, bias=False, seed=3, amx_from_rows=4)
    calls = []
    real = _int8_cpu.swiglu_amx
    monkeypatch.setattr(_int8_cpu, "swiglu_amx", lambda *args: calls.append(args) or real(*args))
    assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, torch.randn(3, 64), 2) is None  # below: VNNI, separately
    assert swiglu_int8(mlp.gate_up_proj, mlp.down_proj, torch.randn(4, 64), 2) is not None
    assert len(calls) == 1
    unpacked = amx_mlp(64, 96, bias=False, seed=3, amx_from_rows=sys.maxsize)  # AMX never runs: nothing packed
    assert unpacked.gate_up_proj.amx_packed is None
    assert swiglu_int8(unpacked.gate_up_proj, unpacked.down_proj, torch.randn(40, 64), 2) is None
    with pytest.raises(ValueError, match="multiples of 32"):
        _int8_cpu.swiglu_amx(1, 1, 1, 1, 0, 1, 0, 1, 4, 48, 64, 1)
