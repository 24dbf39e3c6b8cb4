"""The routed experts' one C call (layers/_moe_cpu.c) against SparseMoE's expert-by-expert loop."""

from __future__ import annotations

import pytest
import torch

from selfhost.layers import activation, linear
from selfhost.layers import moe as moe_module
from selfhost.layers.bf16_linear import Bf16Linear, tiles_available
from selfhost.layers.linear import Linear
from selfhost.layers.moe import EXPERT_KINDS, SparseMoE


def _covered(weights: str) -> bool:
    """Whether this CPU runs experts of these weights in the one C call (AVX-512, AMX for tiles)."""
    products = tiles_available() if weights == "bf16_tiles" else linear.USE_GEMM
    return (moe_module.USE_EXPERT_KERNEL and activation.SILU_MUL_KERNEL and products
            and moe_module._moe_cpu.available(EXPERT_KINDS[weights]))


WEIGHTS = [w for w in ("bf16_tiles", "fp32") if _covered(w)]  # int8: tests/layers/test_moe_int8.py
needs_fp32_call = pytest.mark.skipif(not _covered("fp32"), reason="no AVX-512 fp32 product or MoE kernel here")

ROUTINGS = {  # routing -> SparseMoE keywords
    "softmax_top_k": dict(),
    "group_limited_greedy": dict(num_groups=4, top_k_groups=2),
    "noaux_tc": dict(num_groups=4, top_k_groups=2, routed_scaling_factor=2.5),
}


def _moe(routing: str, normalize: bool, hidden: int = 64, expert_size: int = 32, **extra) -> SparseMoE:
    torch.manual_seed(0)
    layer = SparseMoE(hidden, expert_size, num_experts=8, top_k=2, normalize_top_k=normalize, activation="silu",
                      routing=routing, **ROUTINGS[routing], **extra)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        if layer.e_score_correction_bias is not None:
            layer.e_score_correction_bias.normal_()
    return layer


def _to_bf16_tiles(layer: SparseMoE, few_rows_max: int) -> None:
    for name, module in list(layer.named_modules()):
        if type(module) is Linear:
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child,
                    Bf16Linear.from_linear(module, few_rows_max, "tiles"))


def _both_paths(layer: SparseMoE, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        monkeypatch.setattr(moe_module, "USE_EXPERT_KERNEL", False)
        loop = layer.forward(x, 2)
        monkeypatch.setattr(moe_module, "USE_EXPERT_KERNEL", True)
        one_call = layer.forward(x, 2)
    assert layer.expert_kernel() is not None
    return loop, one_call


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_one_call_equals_the_expert_loop(weights, routing, normalize, tokens, monkeypatch):
    layer = _moe(routing, normalize)
    if weights == "bf16_tiles":
        _to_bf16_tiles(layer, few_rows_max=2)  # experts with 1-2 rows on AVX-512, more on AMX
    loop, one_call = _both_paths(layer, torch.randn(tokens, 64), monkeypatch)
    assert layer.expert_kernel().kind == moe_module.EXPERT_KINDS[weights]
    if routing == "softmax_top_k":  # routed in C: its softmax's last bit may differ from torch's
        torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)
    else:  # the caller's routing: the same kernels on the same rows in the same order
        assert torch.equal(one_call, loop)


@needs_fp32_call
def test_one_call_when_every_token_picks_the_same_experts(monkeypatch):
    layer = _moe("softmax_top_k", True)
    with torch.no_grad():  # every token prefers experts 4 then 1: the other six get no row
        layer.gate.weight.zero_()
        layer.gate.weight[4] += 10.0 / 64
        layer.gate.weight[1] += 5.0 / 64
    x = torch.randn(12, 64).abs()
    loop, one_call = _both_paths(layer, x, monkeypatch)
    torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)


@needs_fp32_call
def test_shared_expert_is_added_after_the_one_call(monkeypatch):
    layer = _moe("softmax_top_k", False, shared_expert_size=48)
    loop, one_call = _both_paths(layer, torch.randn(7, 64), monkeypatch)
    torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)


@needs_fp32_call
@pytest.mark.skipif(not _covered("bf16_tiles"), reason="no AMX tiles on this CPU")
def test_table_follows_modules_replaced_after_the_first_step(monkeypatch):
    """A layer that ran in fp32 and then had its experts converted must not read the old weights."""
    layer = _moe("softmax_top_k", True)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        layer.forward(x)
    assert layer.expert_kernel().kind == moe_module.EXPERT_KINDS["fp32"]
    _to_bf16_tiles(layer, few_rows_max=4)
    loop, one_call = _both_paths(layer, x, monkeypatch)
    assert layer.expert_kernel().kind == moe_module.EXPERT_KINDS["bf16_tiles"]
    torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)


def test_experts_the_kernel_does_not_cover_keep_the_loop():
    biased = _moe("softmax_top_k", True, expert_bias=True)  # gpt-oss: biases and the clamped SwiGLU
    clamped = _moe("softmax_top_k", True, swiglu_alpha=1.702, swiglu_limit=7.0)
    odd_width = _moe("softmax_top_k", True, expert_size=24)
    assert biased.expert_kernel() is None and clamped.expert_kernel() is None
    if _covered("bf16_tiles"):  # the tile products need widths in multiples of 32
        _to_bf16_tiles(odd_width, few_rows_max=2)
        assert odd_width.expert_kernel() is None
