"""int8 experts in the routed experts' one C call (layers/_moe_cpu.c) against the expert loop
(Int8Linear's own kernel) and against torch's product with the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfhost.layers import moe as moe_module
from selfhost.layers.bf16_linear import tiles_available
from selfhost.layers.linear import Linear
from selfhost.layers.moe import EXPERT_KINDS, SparseMoE
from selfhost.quant import int8
from selfhost.quant.int8 import Int8Linear
from tests.layers.test_moe_kernel import _both_paths as _loop_and_call
from tests.layers.test_moe_kernel import _moe

pytestmark = pytest.mark.skipif(
    not (moe_module.USE_EXPERT_KERNEL and int8.avx2_available()
         and moe_module._moe_cpu.available(EXPERT_KINDS["int8"])),
    reason="needs the MoE kernel module and x86-64 with AVX2 (Int8Linear's avx2 kernel)")

ISA_LEVELS = {"avx512-vnni": 2, "avx2": 1, "c": 0}


def _many_rows_path() -> str:
    """Where experts with many rows go on this CPU: 'widened' (bf16 on AMX tiles), 'vnni' or 'dots'."""
    return moe_module._moe_cpu.int8_many_rows()[0]


@pytest.fixture(params=sorted(ISA_LEVELS))
def isa(request):
    """The int8 products capped at one instruction set (skipped where the CPU lacks it)."""
    kernel = moe_module._moe_cpu
    before = kernel.limit_isa(ISA_LEVELS[request.param])
    try:
        if kernel.int8_isa() != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield request.param
    finally:
        kernel.limit_isa(before)


def _int8_moe(routing: str = "softmax_top_k", normalize: bool = True, hidden: int = 64, expert_size: int = 32,
              **extra) -> SparseMoE:
    layer = _moe(routing, normalize, hidden, expert_size, **extra)  # test_moe_kernel.py's random layer
    for expert in layer.experts:  # the experts quantized, the router kept in fp32 (as in the benchmark's model)
        for name in ("gate_up_proj", "down_proj"):
            module = Int8Linear.from_float(getattr(expert, name))
            module.prepare("avx2")
            setattr(expert, name, module)
    return layer


def _both_paths(layer: SparseMoE, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """test_moe_kernel.py's loop and one call, the call on int8 experts."""
    loop, one_call = _loop_and_call(layer, x, monkeypatch)
    assert layer.expert_kernel().kind == EXPERT_KINDS["int8"]
    return loop, one_call


def _dequantized_reference(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in fp64 with the dequantized weights (exact weight-only int8)."""
    from selfhost.layers.router import route

    x = x.double()
    weights, experts = route((x @ layer.gate.weight.double().T).float(), layer.routing, layer.top_k,
                             layer.normalize_top_k, layer.num_groups, layer.top_k_groups, layer.routed_scaling_factor,
                             layer.e_score_correction_bias)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist()):
            expert = layer.experts[e]
            gate_up = x[t] @ int8.dequantize_int8(expert.gate_up_proj.qweight, expert.gate_up_proj.scales).double().T
            gate, up = gate_up.chunk(2)
            down = int8.dequantize_int8(expert.down_proj.qweight, expert.down_proj.scales).double()
            out[t] += w * ((F.silu(gate) * up) @ down.T)
    return out.float()


@pytest.mark.parametrize("routing", ["noaux_tc", "softmax_top_k"])
@pytest.mark.parametrize("tokens", [1, 5, 31])  # under 32 tokens no expert reaches AMX's switch
def test_int8_call_equals_the_expert_loop(isa, routing, tokens, monkeypatch):
    """AVX-512 VNNI on the dots (experts with fewer rows than the VNNI kernel's switch): the loop's bits
    (the same integer lanes, sums and SwiGLU kernel); past the switch, the same integers summed in another
    order. AVX2 and portable C take a plain-C SwiGLU, whose last bits move a few activations' int8 rounding:
    close, not equal."""
    layer = _int8_moe(routing)
    x = torch.randn(tokens, 64)
    loop, one_call = _both_paths(layer, x, monkeypatch)
    path, from_rows = moe_module._moe_cpu.int8_many_rows()
    on_dots = path != "vnni" or int(torch.bincount(_chosen_experts(layer, x).flatten()).max()) < from_rows
    assert on_dots == (tokens == 1 or path != "vnni")  # 5 and 31 tokens: some expert has 2 rows or more
    if isa == "avx512-vnni" and not on_dots:
        torch.testing.assert_close(one_call, loop, rtol=0, atol=1e-3 * loop.abs().max().item())
    elif isa == "avx512-vnni" and routing != "softmax_top_k":  # the caller's routing: the same weights
        assert torch.equal(one_call, loop)
    elif isa == "avx512-vnni":  # routed in C: its softmax's last bit may differ from torch's
        torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(one_call, loop, rtol=0, atol=5e-3 * loop.abs().max().item())


def test_every_instruction_set_gives_the_same_products(monkeypatch):
    """AVX2 and portable C share their SwiGLU: equal bits; and AVX-512 VNNI's integer lanes are theirs."""
    layer, x = _int8_moe("noaux_tc"), torch.randn(40, 64)
    kernel, outs = moe_module._moe_cpu, {}
    before = kernel.limit_isa(2)
    try:
        for level in (1, 0):
            kernel.limit_isa(level)
            if kernel.int8_isa() == {1: "avx2", 0: "c"}[level]:
                outs[level] = _both_paths(layer, x, monkeypatch)[1]
    finally:
        kernel.limit_isa(before)
    assert 0 in outs
    if 1 in outs:
        assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("tokens", [1, 4, 64, 300])
def test_int8_call_is_close_to_the_dequantized_product(tokens, monkeypatch):
    """Stated tolerance: activations are quantized to int8 in blocks of 32 (as Int8Linear's kernel), so the
    layer's output differs from exact weight-only int8 by under 2% of its largest value (~1.2% measured).
    With AMX, experts with 32 rows or more run on the bf16 tile kernels (all of them at 300 tokens): the
    integers exact in bf16, activations rounded to bf16 (under 1%, ~0.4% measured). Without AMX, experts
    with 2 rows or more take the VNNI kernel: the same int8 blocks, so the same 2%."""
    layer, x = _int8_moe("softmax_top_k"), torch.randn(tokens, 64)
    with torch.inference_mode():
        got = layer.forward(x, 2)
    assert layer.expert_kernel().kind == EXPERT_KINDS["int8"]
    expected = _dequantized_reference(layer, x)
    widened = tokens == 300 and _many_rows_path() == "widened"  # 600 pairs over 8 experts: 32 rows or more each
    assert (got - expected).abs().max() < (0.01 if widened else 0.02) * expected.abs().max()


def test_many_rows_widened_with_widths_off_the_packing(monkeypatch):
    """Widths that are not multiples of 64 (the tile layout pads outputs to 64: groups of 16 half or wholly
    past the weight): the padding stays zero and every real output is right."""
    layer, x = _int8_moe("softmax_top_k", hidden=96, expert_size=48), torch.randn(300, 96)
    with torch.inference_mode():
        got = layer.forward(x, 2)
    expected = _dequantized_reference(layer, x)  # a misplaced weight would be off by the output's size
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.skipif(not (tiles_available() and _many_rows_path() == "widened"), reason="widened on AMX tiles only")
def test_many_rows_widened_are_nearer_exact_int8_than_the_loop(monkeypatch):
    """The loop quantizes activations to int8 blocks; the widened rows round them to bf16."""
    layer, x = _int8_moe("noaux_tc"), torch.randn(300, 64)
    loop, one_call = _both_paths(layer, x, monkeypatch)
    expected = _dequantized_reference(layer, x)
    assert (one_call - expected).abs().max() < 0.5 * (loop - expected).abs().max()


def test_int8_call_when_every_token_picks_the_same_experts(monkeypatch):
    """Six experts without a row, two with all of them (more rows than a chunk of 128; widened where the tile
    kernels are)."""
    layer = _int8_moe()
    with torch.no_grad():  # every token prefers experts 4 then 1
        layer.gate.weight.zero_()
        layer.gate.weight[4] += 10.0 / 64
        layer.gate.weight[1] += 5.0 / 64
    x = torch.randn(200, 64).abs()
    loop, one_call = _both_paths(layer, x, monkeypatch)
    if _many_rows_path() == "widened":  # two experts of 200 rows each
        expected = _dequantized_reference(layer, x)
        assert (one_call - expected).abs().max() < 0.01 * expected.abs().max()
    elif _many_rows_path() == "vnni":  # the loop's integers, summed in another order
        torch.testing.assert_close(one_call, loop, rtol=0, atol=5e-3 * loop.abs().max().item())
    else:
        torch.testing.assert_close(one_call, loop, rtol=1e-5, atol=1e-6)


def _chosen_experts(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """(T, k) experts the layer's router picks for x."""
    from selfhost.layers.router import route

    with torch.no_grad():
        return route(layer.gate.forward(x).float(), layer.routing, layer.top_k, layer.normalize_top_k,
                     layer.num_groups, layer.top_k_groups, layer.routed_scaling_factor,
                     layer.e_score_correction_bias)[1]


needs_vnni_rows = pytest.mark.skipif(_many_rows_path() != "vnni", reason="the VNNI kernel runs on AVX-512 without AMX")


@needs_vnni_rows
@pytest.mark.parametrize("tokens", [5, 40, 300])
def test_many_rows_vnni_sum_the_loops_integers(tokens, monkeypatch):
    """The VNNI kernel (experts with 2 rows or more: two of four at 5 tokens, all at 40 and 300) multiplies the
    same int8 blocks as the loop's dots (activations offset to unsigned, the offset taken back from each block's
    sum), so the two differ only by fp32 summation order and the int8 rounding of a few SwiGLU outputs that
    order moves; a wrong offset, block scale or row would miss by the output's own size."""
    layer, x = _int8_moe("noaux_tc"), torch.randn(tokens, 64)
    loop, one_call = _both_paths(layer, x, monkeypatch)
    counts = torch.bincount(_chosen_experts(layer, x).flatten(), minlength=8)
    assert int(counts.max()) >= 2 and (int(counts[counts > 0].min()) == 1) == (tokens == 5)  # 5: both paths
    torch.testing.assert_close(one_call, loop, rtol=0, atol=1e-3 * loop.abs().max().item())


@needs_vnni_rows
@pytest.mark.parametrize("rows", [2, 3, 6, 16, 17, 23])  # whole passes of 6 rows and remainders 2-5
def test_many_rows_vnni_every_row_count(rows, monkeypatch):
    """Every token to the same two experts: `rows` rows each, in passes of six and a tail of 1-5, over a
    hidden size of three strips (96) and experts of 64 (gate_up of 128 outputs: four strips)."""
    layer = _int8_moe(hidden=96, expert_size=64)
    with torch.no_grad():  # every token prefers experts 2 then 6
        layer.gate.weight.zero_()
        layer.gate.weight[2] += 10.0 / 96
        layer.gate.weight[6] += 5.0 / 96
    x = torch.randn(rows, 96).abs()
    loop, one_call = _both_paths(layer, x, monkeypatch)
    torch.testing.assert_close(one_call, loop, rtol=0, atol=1e-3 * loop.abs().max().item())
    expected = _dequantized_reference(layer, x)
    assert (one_call - expected).abs().max() < 0.02 * expected.abs().max()


def test_int8_experts_the_call_does_not_cover_keep_the_loop():
    fallback = _int8_moe()
    for expert in fallback.experts:  # torch's dequantizing kernel: the call's products would not be its
        expert.gate_up_proj.prepare("dequant"), expert.down_proj.prepare("dequant")
    mixed = _int8_moe()
    mixed.experts[3].down_proj = Linear(32, 64, bias=False)  # one fp32 product among int8 ones
    assert fallback.expert_kernel() is None and mixed.expert_kernel() is None
