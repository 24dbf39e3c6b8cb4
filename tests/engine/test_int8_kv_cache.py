"""The int8 KV cache: its rounding, the C kernels over it against the torch paths and a dequantized
reference, and what it does to a trained model's output."""

from types import SimpleNamespace

import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.engine import paged_cache
from selfhost.engine.kv_layout import (
    dequantize_rows,
    key_rows,
    quantize_rows,
    value_rows,
)
from selfhost.engine.paged_cache import PagedKVCache
from selfhost.errors import InvalidParameterError
from tests.engine.test_paged_attention_kernel import (
    chunk_step,
    fused_and_torch_steps,
    plain_attention,
    random_step,
    tiles_and_exact,
)

DEMO = "src/selfhost/assets/shakespeare"

needs_kernels = pytest.mark.skipif(
    not paged_cache.narrow_cache_kernels_available(torch.int8), reason="the kernels take an int8 cache on CPUs with AVX512-BW and VNNI only"
)
needs_tiles = pytest.mark.skipif(
    not (paged_cache.narrow_cache_kernels_available(torch.int8) and paged_cache._prefill_attention_cpu.tiles_available()),
    reason="prompt attention on tiles needs AMX-BF16 (and the OS's grant of its state)",
)


def int8_contents(cache, gen):
    """Random integers and scales in the whole cache (not randn cast to int8: that truncates to a few values)."""
    cache.k.copy_(torch.randint(-127, 128, cache.k.shape, generator=gen))
    cache.v.copy_(torch.randint(-127, 128, cache.v.shape, generator=gen))
    cache.k_scale.copy_(torch.rand(cache.k_scale.shape, generator=gen) * 0.02 + 0.002)
    cache.v_scale.copy_(torch.rand(cache.v_scale.shape, generator=gen) * 0.02 + 0.002)


def dequantized_twin(cache) -> PagedKVCache:
    """An fp32 cache holding what the int8 one means: each integer times its scale."""
    layers, heads, blocks, block_size, dim = (cache.k.shape[0], cache.num_kv_heads, cache.num_blocks, cache.block_size,
                                              cache.head_dim)
    spec = SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=dim)
    twin = PagedKVCache(spec, blocks, block_size, torch.float32, torch.device("cpu"))
    for layer in range(layers):  # keys as rows, then back into the fp32 cache's dims-major blocks
        rows = key_rows(cache.k[layer], torch.arange(blocks)).float()  # (Hkv, NB * BS, D)
        rows *= cache.k_scale[layer].reshape(heads, -1, 1)
        twin.k[layer].copy_(rows.view(heads, blocks, block_size, -1).transpose(2, 3))
    for layer in range(layers):  # values as rows (an int8 cache keeps them in pairs of keys)
        rows = value_rows(cache.v[layer], torch.arange(blocks)).float()
        twin.v[layer].copy_((rows * cache.v_scale[layer].reshape(heads, -1, 1)).view(twin.v[layer].shape))
    return twin


def int16_rounding_bound(q, cache, twin, scale, lens, layer=1) -> float:
    """How far the decode kernel's output may be from exact attention over the same int8 cache. Its VNNI
    products take 16-bit integers: each query head rounded (max |q| -> 32767), so a score moves by at
    most scale * (max|q| / 65534) * sum_d |k_d| and an output by at most twice the largest move times
    the largest value (the probabilities move by at most that in sum; a soft cap only shrinks moves);
    and each weight (probability times value scale, <= the largest scale) rounded against its chunk's
    largest, within half of 1/32767 of it, so an output moves by at most that times the largest integer
    (127) for each of the longest sequence's keys."""
    key_sums = key_rows(twin.k[layer], torch.arange(twin.k.shape[2])).abs().sum(-1).max()
    score_move = scale * q.abs().max() / 65534 * key_sums
    query_part = 2 * score_move.item() * twin.v[layer].abs().max().item()
    return query_part + max(lens) * 127 * 0.5 / 32767 * cache.v_scale[layer].max().item()


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=gen) * torch.rand(50, 3, 1, generator=gen) * 10
    x[7, 1] = 0.0  # a row of zeros: scale 0, integers 0
    q, scales = quantize_rows(x)
    assert q.dtype == torch.int8 and scales.shape == (50, 3)
    assert scales[7, 1] == 0 and not q[7, 1].any()
    # The largest element of each row lands on +-127, and every element within half a step.
    assert torch.equal(q.abs().amax(-1)[scales > 0], torch.full_like(q.abs().amax(-1)[scales > 0], 127))
    error = (dequantize_rows(q, scales, torch.float32) - x).abs()
    assert (error <= scales.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all()
    assert error.max() > 0  # not a lossless format: the bound is what holds


def test_an_int8_cache_holds_scales_and_counts_them_in_its_blocks():
    spec = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=64, kv_bytes_per_token=2 * 3 * 2 * 64)
    cache = PagedKVCache(spec, 10, 16, torch.float32, torch.device("cpu"), torch.int8)
    assert cache.k.dtype == cache.v.dtype == torch.int8 and cache.kv_kind == 2
    assert cache.k_scale.shape == cache.v_scale.shape == (3, 2, 10, 16)
    stored = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale))
    assert PagedKVCache.bytes_per_block(spec, 16, torch.int8) * 10 == stored
    bf16 = PagedKVCache.bytes_per_block(spec, 16, torch.bfloat16)
    assert bf16 / PagedKVCache.bytes_per_block(spec, 16, torch.int8) == pytest.approx(2 * 64 / (64 + 4))


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_kernels), False], ids=["kernel", "torch"])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,window,softcap",
    [(9, 3, 64, None, None), (8, 8, 128, None, None), (8, 4, 256, None, 50.0), (4, 2, 64, 20, None)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_decode_matches_attention_over_the_dequantized_cache(use_kernel, num_heads, num_kv_heads, head_dim,
                                                                 window, softcap, threads):
    lens = [1, 5, 16, 17, 33, 100, 64]
    scale = head_dim**-0.5
    cache, meta, tables, q, k, v = random_step(num_heads, num_kv_heads, head_dim, 16, lens, seed=7, kv_dtype=torch.int8)
    int8_contents(cache, torch.Generator().manual_seed(1))
    assert cache.use_cpu_kernel == paged_cache.narrow_cache_kernels_available(torch.int8)
    cache.use_cpu_kernel = use_kernel
    cache.meta = meta
    meta.num_threads = threads
    got = cache.attend(1, q, k, v, scale, window, softcap)
    # The step's own key and value went in quantized, with their scales.
    slot = meta.slot_mapping[3].item()
    want_v, want_scale = quantize_rows(v[3])
    assert torch.equal(value_rows(cache.v[1], torch.arange(cache.num_blocks))[:, slot], want_v)
    assert torch.equal(cache.v_scale[1].flatten(1, 2)[:, slot], want_scale)
    twin = dequantized_twin(cache)
    expected = plain_attention(twin, 1, tables, lens, q, scale, window, softcap)
    bound = 2e-5 + (int16_rounding_bound(q, cache, twin, scale, lens) if use_kernel else 0.0)
    assert (got - expected).abs().max() < bound
    # The worst case adds every rounding error up; independent errors mostly cancel (measured: a mean
    # of ~8e-6 against outputs up to ~3), so a layout or scale mistake cannot hide under the bound.
    assert (got - expected).abs().mean() < 2e-5


@needs_kernels
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,softcap", [(9, 3, 64, None, None), (8, 4, 128, 20, 30.0)])
@pytest.mark.parametrize("store_first", [False, True])
def test_int8_fused_step_writes_the_bytes_torch_writes(num_heads, num_kv_heads, head_dim, window, softcap, store_first):
    def contents(cache, meta, k, v):
        int8_contents(cache, torch.Generator().manual_seed(2))
        k[2, 0] = 0.0  # a key of zeros: scale 0
        meta.store_first = store_first

    caches, outs, rotated_q = fused_and_torch_steps(num_heads, num_kv_heads, head_dim, window, softcap, torch.int8,
                                                    contents)
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    lens, scale = [1, 5, 16, 17, 33, 100, 64], head_dim**-0.5  # fused_and_torch_steps' step
    bound = 2e-5 + int16_rounding_bound(rotated_q, caches[1], dequantized_twin(caches[1]), scale, lens)
    assert (outs[0] - outs[1]).abs().max() < bound


@needs_kernels
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,window",
                         [(9, 3, 64, 16, None), (8, 8, 128, 16, None), (6, 2, 96, 16, 100), (4, 2, 64, 32, 20)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_prefill_kernel_matches_torch_path(num_heads, num_kv_heads, head_dim, block_size, window, threads):
    # Whole prompts, chunks continuing a cached prefix, runs straddling blocks, past every block edge.
    chunks = [(0, 1), (0, 37), (50, 13), (0, 100), (129, 70), (16, 16), (7, 40)]
    scale = head_dim**-0.5
    results, caches = {}, {}
    for use_kernel in (True, False):
        cache, meta, q, k, v = chunk_step(num_heads, num_kv_heads, head_dim, block_size, chunks, seed=5,
                                          kv_dtype=torch.int8)
        int8_contents(cache, torch.Generator().manual_seed(4))
        assert cache.use_prefill_kernel
        cache.use_prefill_kernel = use_kernel
        cache.use_prefill_tiles = False  # the AVX-512 kernel: fp32 arithmetic (tiles: below)
        cache.meta = meta
        meta.num_threads = threads
        results[use_kernel] = cache.attend(1, q, k, v, scale, window, None)
        caches[use_kernel] = cache
    assert (results[True] - results[False]).abs().max() < 2e-5
    assert torch.equal(caches[True].k, caches[False].k) and torch.equal(caches[True].v_scale, caches[False].v_scale)


@needs_tiles
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window", [(9, 3, 64, None), (8, 8, 128, None), (16, 1, 64, 7)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_prefill_on_tiles_is_bf16_attention(num_heads, num_kv_heads, head_dim, window, threads):
    """The integers go into the tiles exactly; queries and probabilities times value scales are rounded
    to bf16. Against exact attention over the dequantized cache with bf16-rounded queries each output
    differs by at most that rounding, a relative 2^-8 (half of bf16's 2^-7 step), times the largest
    dequantized value. (A bf16 cache's bound is nearer 2^-9: its dominant key's probability is 1, exact
    in bf16; here it is multiplied by a scale first.)"""
    chunks = [(0, 1), (0, 37), (50, 13), (0, 100), (129, 70), (16, 16), (300, 150)]
    scale = head_dim**-0.5
    cache, meta, q, k, v = chunk_step(num_heads, num_kv_heads, head_dim, 16, chunks, seed=5, kv_dtype=torch.int8)
    int8_contents(cache, torch.Generator().manual_seed(6))
    got, want = tiles_and_exact(cache, meta, q, k, v, scale, window, threads)
    largest = dequantized_twin(cache).v[1].abs().max().item()
    error = (got - want).abs().max().item()
    assert 0 < error <= 2**-8 * largest + 1e-5


def test_demo_model_with_an_int8_cache_keeps_its_greedy_text_and_close_logprobs():
    """What "not exact" means on a trained model: the same greedy continuation as fp32 keys and values
    over 3 x 96 tokens, and chosen-token log-probabilities within 0.05."""
    prompts = ["To be, or not", "ROMEO:\nBut soft, what light", "KING HENRY:\nOnce more unto the breach"]
    params = SamplingParams(max_tokens=96, temperature=0, logprobs=1)
    outs = {}
    for kv in ("float32", "int8"):
        llm = LLM(DEMO, weight_dtype="float32", kv_cache_dtype=kv, kv_cache_memory="32MiB")
        assert llm.engine.cache.k.dtype == getattr(torch, kv)
        outs[kv] = llm.generate(prompts, params)
    for exact, int8 in zip(outs["float32"], outs["int8"]):
        assert int8.token_ids == exact.token_ids
        gaps = [abs(a.logprob - b.logprob) for a, b in zip(exact.logprobs, int8.logprobs)]
        assert max(gaps) < 0.05 and max(gaps) > 0


def test_int8_cache_is_refused_where_its_attention_cannot_read_it():
    with pytest.raises(InvalidParameterError, match="'int8'"):
        LLM(DEMO, kv_cache_dtype="int4")
    from selfhost.llm import pick_kv_cache_dtype

    assert pick_kv_cache_dtype("int8", torch.float32, False) == torch.int8


def test_auto_cache_is_bf16_under_quantized_weights_where_prompt_attention_has_tiles(monkeypatch):
    from selfhost import llm as llm_module
    from selfhost.quant.config import QuantConfig

    cpu = torch.device("cpu")
    quantized, plain = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    quantized.quant_config = QuantConfig(method="int8")
    for tiles in (True, False):
        monkeypatch.setattr(llm_module, "prompt_tiles_available", lambda tiles=tiles: tiles)
        assert llm_module.narrow_weights(quantized, cpu) is tiles
        assert llm_module.narrow_weights(plain, cpu) is False
        picked = llm_module.pick_kv_cache_dtype("auto", torch.float32, llm_module.narrow_weights(quantized, cpu))
        assert picked == (torch.bfloat16 if tiles else torch.float32)
        # an explicit choice stands
        assert llm_module.pick_kv_cache_dtype("float32", torch.float32, True) == torch.float32


def test_an_int8_model_gets_the_cache_its_prompt_attention_reads_fastest():
    from selfhost.engine.paged_cache import prompt_tiles_available

    llm = LLM(DEMO, quantization="int8")
    assert llm.kv_cache_dtype == (torch.bfloat16 if prompt_tiles_available() else torch.float32)
    assert llm.engine.stats().kv_cache_dtype == str(llm.kv_cache_dtype).removeprefix("torch.")
