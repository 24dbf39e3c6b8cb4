"""Linear layers with bf16 weights and fp32 activations: the C kernel and torch's bf16 matmul
against a float64 reference on the bf16-rounded weights; the converted model against fp32."""

import pytest
import torch

from selfhost.errors import InvalidParameterError
from selfhost.layers import bf16_linear
from selfhost.layers.bf16_linear import Bf16Linear, measure_few_rows_max

needs_kernel = pytest.mark.skipif(not bf16_linear.c_kernel_available(),
                                  reason="the bf16-weight C kernel needs AVX-512 (F, BW, VL)")
needs_tiles = pytest.mark.skipif(not bf16_linear.tiles_available(),
                                 reason="the 'tiles' layout needs AVX-512 (F, BW, VL)")
needs_amx = pytest.mark.skipif(not bf16_linear.amx_available(),
                               reason="AMX-BF16 (Sapphire Rapids or later), granted by the OS")


def reference(x: torch.Tensor, layer: Bf16Linear) -> torch.Tensor:
    """Exact sums of x times the stored (bf16) weights, in float64."""
    out = x.double() @ layer.dense_weight().double().T
    return out if layer.bias is None else out + layer.bias.double()


def random_linear(in_features: int, out_features: int, bias: bool, seed: int) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear


def random_layer(in_features: int, out_features: int, bias: bool, few_rows_max: int, seed: int,
                 layout: str = "rows") -> Bf16Linear:
    return Bf16Linear.from_linear(random_linear(in_features, out_features, bias, seed), few_rows_max, layout)


# Widths below, at and past multiples of 32 (an AMX tile's depth) and of 16 and 64 (its width, a chunk's).
TILE_SHAPES = [(768, 96), (37, 53), (64, 31), (100, 130), (48, 5), (576, 200)]


@needs_tiles
@pytest.mark.parametrize("in_features,out_features", TILE_SHAPES)
def test_tiles_layout_holds_the_rounded_weights(in_features, out_features):
    linear = random_linear(in_features, out_features, bias=False, seed=in_features)
    layer = Bf16Linear.from_linear(linear, layout="tiles")
    assert torch.equal(layer.dense_weight(), linear.weight.to(torch.bfloat16))


@needs_tiles
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 12, 13, 16, 17, 31, 32, 33, 70])
@pytest.mark.parametrize("in_features,out_features", TILE_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_tiles_few_rows_kernel_sums_exact_activations(rows, in_features, out_features, bias):
    layer = random_layer(in_features, out_features, bias, few_rows_max=1000, seed=rows, layout="tiles")
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + 1))
    with torch.inference_mode():
        got = layer(x, 1 + rows % 2)
    expected = reference(x, layer)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@needs_tiles
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 32, 33, 64, 100, 513])
@pytest.mark.parametrize("in_features,out_features", TILE_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_many_row_product_rounds_at_most_the_activations(rows, in_features, out_features, bias):
    # On AMX, sums leave the tiles as fp32: against exact sums of the bf16-rounded activations, only
    # fp32 summation error remains (no rounding of the outputs to bf16, unlike torch's path). Without
    # AMX the few-row kernel takes every size: the activations are not rounded at all.
    layer = random_layer(in_features, out_features, bias, few_rows_max=0, seed=rows, layout="tiles")
    x = torch.randn(2, rows, in_features, generator=torch.Generator().manual_seed(rows + 2))
    with torch.inference_mode():
        got = layer(x, 2)
    expected = reference(x.bfloat16().float() if bf16_linear.amx_available() else x, layer)
    assert got.shape == (2, rows, out_features)
    assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@needs_amx
def test_amx_product_survives_other_tile_users_on_the_same_threads():
    # The kernels leave their tile configuration loaded and reload it only where a thread's
    # differs: torch's own bf16 matmul (oneDNN, AMX here) configures the same threads its own way
    # in between, and the product must still be the exact one.
    layer = random_layer(96, 160, False, few_rows_max=0, seed=5, layout="tiles")
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(6))
    expected = reference(x.bfloat16().float(), layer)
    odd = torch.randn(37, 300).bfloat16(), torch.randn(300, 45).bfloat16()
    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(*odd)
            got = layer(x, 2)
            assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@needs_tiles
def test_tiles_layout_takes_other_dtypes_through_the_dense_weight():
    layer = random_layer(96, 80, bias=True, few_rows_max=4, seed=9, layout="tiles")
    x = torch.randn(3, 96, dtype=torch.float64)
    expected = x @ layer.dense_weight().double().T + layer.bias.double()
    assert torch.allclose(layer(x), expected)


def test_tiles_layout_is_refused_where_the_cpu_lacks_avx512():
    if bf16_linear.tiles_available():
        assert bf16_linear.best_layout() == "tiles"
    else:
        assert bf16_linear.best_layout() == "rows" and not bf16_linear.amx_available()
        with pytest.raises(ValueError, match="AVX-512"):
            Bf16Linear(64, 64, bias=False, layout="tiles")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13])
@pytest.mark.parametrize("in_features,out_features", [(768, 96), (37, 53), (64, 31), (100, 130), (48, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_sums_fp32_activations_times_bf16_weights(rows, in_features, out_features, threads):
    # Widths below, at and past multiples of 32 (the paired main loop) and of 16 (the masked tail).
    layer = random_layer(in_features, out_features, bias=True, few_rows_max=64, seed=rows + in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = layer(x, threads)
    expected = reference(x, layer)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 9, 40])
def test_torch_path_rounds_activations_and_products_to_bf16(rows):
    layer = random_layer(96, 80, bias=False, few_rows_max=0, seed=3)
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = layer(x, 2)
    expected = reference(x.bfloat16().float(), layer)  # then rounded once more, to bf16 (8-bit mantissa)
    assert got.shape == (2, rows, 80)
    error = (got.double() - expected).abs()
    assert (error <= expected.abs() * 2**-8 + 1e-4 * expected.abs().max()).all()


@needs_kernel
def test_both_paths_agree_to_bf16_precision():
    layer = random_layer(256, 128, bias=False, few_rows_max=64, seed=5)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        c_kernel = layer(x)
        layer.few_rows_max = 0
        onednn = layer(x)
    assert (c_kernel - onednn).abs().max() <= 2e-2 * c_kernel.abs().max()


@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_the_switch_is_measured_from_the_probe_rows(layout):
    chosen = measure_few_rows_max(256, 512, layout)
    assert chosen in (0, *bf16_linear._PROBE_ROWS)
    kernel = bf16_linear.tiles_available() if layout == "tiles" else bf16_linear.c_kernel_available()
    if not kernel:  # no few-row kernel for this layout here: every product takes the other path
        assert chosen == 0


@pytest.fixture(scope="module")
def demo_models():
    from selfhost import LLM

    return LLM(None, kv_cache_memory="64MiB"), LLM(None, kv_cache_memory="64MiB", weight_dtype="bfloat16")


def test_converted_model_holds_bf16_linear_weights_in_half_the_bytes(demo_models):
    fp32, bf16 = demo_models
    linears = [m for m in bf16.model.modules() if isinstance(m, Bf16Linear)]
    assert len(linears) == 1 + 4 * bf16.model.spec.num_layers  # lm_head; qkv, o, gate_up, down per layer
    assert all(m.weight.dtype == torch.bfloat16 and m.layout == bf16_linear.best_layout() for m in linears)
    fp32_linears = dict(fp32.model.named_modules())
    for name, module in bf16.model.named_modules():
        if isinstance(module, Bf16Linear):
            assert torch.equal(module.dense_weight(), fp32_linears[name].weight.to(torch.bfloat16))

    def linear_bytes(model):
        return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n.endswith("proj"))

    def padded(n: int, to: int) -> int:
        return -(-n // to) * to

    # "tiles" pads outputs to 64 and inputs to 32 (zero weights): half the bytes of the padded shape.
    padded_fp32 = sum(padded(m.out_features, 64) * padded(m.in_features, 32) * 4 if m.layout == "tiles"
                      else m.weight.numel() * 4 for n, m in bf16.model.named_modules() if n.endswith("proj"))
    assert linear_bytes(bf16.model) * 2 == padded_fp32 and padded_fp32 >= linear_bytes(fp32.model)


TEXT = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to.
"""


def test_converted_model_stays_close_to_fp32(demo_models):
    # Teacher-forced: every token of a text scored given the true prefix, so one near-tie
    # flipped early cannot make the rest of a free-running comparison meaningless.
    from selfhost import SamplingParams

    fp32, bf16 = demo_models
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    a, b = ([e.logprob for e in llm.generate(TEXT, params)[0].prompt_logprobs[1:]] for llm in (fp32, bf16))
    differences = [abs(x - y) for x, y in zip(a, b)]
    assert len(differences) > 50
    assert max(differences) < 0.1 and sum(differences) / len(differences) < 0.01
    # Perplexity on the text moves by well under 1%.
    assert abs(sum(a) - sum(b)) / abs(sum(a)) < 0.01
    greedy = SamplingParams(max_tokens=8, temperature=0)
    assert fp32.generate("To be, or not", greedy)[0].token_ids[:4] == bf16.generate("To be, or not", greedy)[0].token_ids[:4]


@pytest.mark.parametrize(
    "options", [{"weight_dtype": "int8"}, {"weight_dtype": "bf16", "quantization": "int8"},
                {"weight_dtype": "bf16", "dtype": "bfloat16"}]
)
def test_bad_weight_dtype_requests_are_refused_before_loading(options):
    from selfhost import LLM

    with pytest.raises(InvalidParameterError):
        LLM(None, **options)


def test_bf16_weights_bring_a_bf16_kv_cache_unless_told_otherwise(demo_models):
    from selfhost import LLM

    fp32, bf16 = demo_models
    assert fp32.engine.cache.k.dtype == torch.float32 and bf16.engine.cache.k.dtype == torch.bfloat16
    exact_cache = LLM(None, kv_cache_memory="64MiB", weight_dtype="bfloat16", kv_cache_dtype="float32")
    assert exact_cache.engine.cache.v.dtype == torch.float32
    # The same memory holds twice the tokens in bf16.
    assert bf16.engine.capacity_tokens == 2 * exact_cache.engine.capacity_tokens


@pytest.mark.parametrize("options", [{"kv_cache_dtype": "int4"}, {"kv_cache_dtype": "float32", "dtype": "bfloat16"}])
def test_bad_kv_cache_dtype_requests_are_refused_before_loading(options):
    from selfhost import LLM

    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        LLM(None, **options)


@needs_amx
@pytest.mark.parametrize("rows", [3, 16, 33, 300])
@pytest.mark.parametrize("hidden,intermediate", [(64, 32), (96, 160), (576, 1536)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_swiglu_in_one_call_is_the_three_passes_bit_for_bit(rows, hidden, intermediate, threads):
    from selfhost.layers.mlp import GatedMLP

    mlp = GatedMLP(hidden, intermediate, "silu", bias=False)
    gate_up = random_layer(hidden, 2 * intermediate, False, 2, seed=rows, layout="tiles")
    down = Bf16Linear.from_linear(random_linear(intermediate, hidden, True, seed=rows + 1), 2, "tiles")
    mlp.gate_up_proj, mlp.down_proj = gate_up, down
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        fused = bf16_linear.swiglu_tiles(gate_up, down, x, threads)
        separate = down.forward(mlp.act(gate_up.forward(x, threads), threads), threads)
        assert torch.equal(fused, separate)
        assert torch.equal(mlp.forward(x, threads), separate)
    # and against the formula over the bf16-rounded operands: only the activations' rounding differs
    g, u = (x.bfloat16().float() @ gate_up.dense_weight().float().t()).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(g) * u).bfloat16().float()
    exact = act @ down.dense_weight().float().t() + down.bias
    assert (fused - exact).abs().max() <= 2**-7 * exact.abs().max()


@needs_amx
def test_swiglu_in_one_call_declines_what_it_does_not_cover():
    gate_up = random_layer(64, 64, False, 4, seed=1, layout="tiles")
    down = random_layer(32, 64, False, 4, seed=2, layout="tiles")
    with torch.inference_mode():
        assert bf16_linear.swiglu_tiles(gate_up, down, torch.randn(4, 64), 1) is None  # few rows: exact kernels
        assert bf16_linear.swiglu_tiles(gate_up, down, torch.randn(5, 64), 1) is not None
        with_bias = random_layer(64, 64, True, 4, seed=3, layout="tiles")
        assert bf16_linear.swiglu_tiles(with_bias, down, torch.randn(5, 64), 1) is None
    assert bf16_linear.swiglu_tiles(gate_up, down, torch.randn(5, 64), 1) is None  # autograd on


@needs_tiles
def test_swiglu_in_one_call_only_on_amx():
    # Without AMX the MLP's products run on the exact few-row kernel, three passes as GatedMLP has them.
    gate_up = random_layer(64, 64, False, 4, seed=1, layout="tiles")
    down = random_layer(32, 64, False, 4, seed=2, layout="tiles")
    with torch.inference_mode():
        fused = bf16_linear.swiglu_tiles(gate_up, down, torch.randn(40, 64), 1)
    assert (fused is not None) == bf16_linear.amx_available()


@needs_tiles
@torch.inference_mode()
def test_the_widening_kernels_give_the_same_bits_at_any_row_count():
    # Below 24 rows, passes of up to 4 rows over four blocks or 5-12 over two; 12-row passes from there:
    # each output's sum runs in the same order, so a row's result does not depend on how many rows share
    # the call (the decode runner and the Python path may batch the same rows differently; a speculative
    # verification's rows must be what single decode steps give).
    layer = random_layer(96, 80, bias=True, few_rows_max=1000, seed=11, layout="tiles")
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(12))
    alone = torch.cat([layer(x[i : i + 1], 1) for i in range(40)])
    for rows in range(2, 41):
        assert torch.equal(layer(x[:rows], 2), alone[:rows]), rows


def test_the_switch_is_measured_once_per_shape_and_layout_and_follows_the_timings(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bf16_linear, "tiles_available", lambda: True)
    monkeypatch.setattr(bf16_linear, "c_kernel_available", lambda: True)
    monkeypatch.setattr(bf16_linear, "amx_available", lambda: True)
    calls = []

    def timings(in_features, out_features, layout):  # the few-row kernel loses from 16 rows on
        calls.append((in_features, out_features, layout))
        return {**{f"few@{r}": 1.0 + (r >= 16) for r in bf16_linear._PROBE_ROWS},
                **{f"many@{r}": 1.5 for r in bf16_linear._PROBE_ROWS}}

    monkeypatch.setattr(bf16_linear, "measure", timings)
    assert measure_few_rows_max(64, 128, "tiles") == 12 and measure_few_rows_max(64, 128, "tiles") == 12
    assert measure_few_rows_max(64, 128, "rows") == 12 and measure_few_rows_max(64, 256, "tiles") == 12
    assert calls == [(64, 128, "tiles"), (64, 128, "rows"), (64, 256, "tiles")]  # the repeat came from the cache
    monkeypatch.setattr(bf16_linear, "measure", lambda *args: {k: 1.0 for k in timings(*args)} | {"few@1": 2.0})
    # a slower few-row kernel at one row: "rows" runs torch's product from the first row, "tiles" keeps its
    # one-row decode on the exact kernel whatever the probe says
    assert measure_few_rows_max(32, 32, "rows") == 0 and measure_few_rows_max(32, 32, "tiles") == 64
