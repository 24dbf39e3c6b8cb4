"""The C paged-attention kernel against the torch gather path, and both against plain attention."""

import os
import random
import shutil
from types import SimpleNamespace

import pytest
import torch

from selfhost.engine import paged_cache
from selfhost.engine.paged_cache import PagedKVCache, StepMetadata



def test_kernel_is_built_where_a_compiler_exists():
    # The extension is optional for users without a compiler; here it must not silently vanish.
    if shutil.which("cc") or shutil.which("gcc"):
        assert paged_cache._paged_attention_cpu is not None, "run `pip install -e .` to build the C kernels"
        assert paged_cache.CPU_KERNEL_ENABLED or os.environ.get("SELFHOST_PAGED_ATTENTION") == "torch"


needs_kernel = pytest.mark.skipif(paged_cache._paged_attention_cpu is None, reason="no C compiler: kernel not built")


@pytest.fixture(params=[2, 1, 0], ids=["avx512", "avx2", "portable"])
def isa(request):
    """Each test runs the kernel on every instruction set this machine has (the C code
    picks the widest; a lower cap exercises the narrower paths too)."""
    before = paged_cache._paged_attention_cpu.limit_isa(request.param)
    yield request.param
    paged_cache._paged_attention_cpu.limit_isa(before)


def random_cache(num_kv_heads, head_dim, block_size, lens, seed, kv_dtype=torch.float32):
    """A cache of random keys and values whose sequences (of `lens` tokens) own shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    spec = SimpleNamespace(num_layers=2, num_kv_heads=num_kv_heads, head_dim=head_dim)
    cache = PagedKVCache(spec, num_blocks, block_size, torch.float32, torch.device("cpu"), kv_dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    return cache, [[free.pop() for _ in range(n)] for n in blocks_needed], gen


def random_step(num_heads, num_kv_heads, head_dim, block_size, lens, seed, kv_dtype=torch.float32):
    """A cache whose sequences own shuffled blocks, plus this step's single-token queries."""
    cache, tables, gen = random_cache(num_kv_heads, head_dim, block_size, lens, seed, kv_dtype)
    max_blocks = max(len(t) for t in tables)
    meta = StepMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)]),
        num_single=len(lens),
        single_block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
        single_context_lens=torch.tensor(lens),
        chunks=[],
    )
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    k = torch.randn(len(lens), num_kv_heads, head_dim, generator=gen)
    v = torch.randn(len(lens), num_kv_heads, head_dim, generator=gen)
    return cache, meta, tables, q, k, v


def plain_attention(cache, layer, tables, lens, q, scale, window, softcap):
    """Reference: each sequence's keys laid out in order, softmax over the visible ones."""
    num_kv_heads = cache.v.shape[1]
    group = q.shape[1] // num_kv_heads
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens)):
        keys = paged_cache.key_rows(cache.k[layer], torch.tensor(table))[:, :n].float()  # (Hkv, n, D)
        values = cache.v[layer][:, table].flatten(1, 2)[:, :n].float()
        first = max(0, n - window) if window else 0
        keys, values = keys.repeat_interleave(group, 0)[:, first:], values.repeat_interleave(group, 0)[:, first:]
        scores = torch.einsum("hd,hld->hl", q[i], keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        outs.append(torch.einsum("hl,hld->hd", scores.softmax(-1), values))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,window,softcap",
    [(9, 3, 64, 16, None, None), (8, 8, 128, 16, None, None), (4, 2, 80, 8, 20, None), (8, 4, 256, 16, None, 50.0),
     (6, 1, 36, 4, 7, 30.0)],
)
@pytest.mark.parametrize("threads", [1, 2])
@needs_kernel
def test_kernel_matches_torch_path_and_reference(num_heads, num_kv_heads, head_dim, block_size, window, softcap, threads,
                                                isa):
    lens = [1, 5, 16, 17, 33, 100, 64]
    scale = head_dim**-0.5
    results = {}
    for use_kernel in (True, False):
        cache, meta, tables, q, k, v = random_step(num_heads, num_kv_heads, head_dim, block_size, lens, seed=7)
        cache.use_cpu_kernel = use_kernel
        cache.meta = meta
        meta.num_threads = threads  # the kernels take the step's thread count from its metadata
        results[use_kernel] = cache.attend(1, q, k, v, scale, window, softcap)
    expected = plain_attention(cache, 1, tables, lens, q, scale, window, softcap)
    assert (results[True] - expected).abs().max() < 1e-5
    assert (results[False] - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,window,softcap",
    [(9, 3, 64, 16, None, None), (4, 2, 80, 8, 20, None), (8, 4, 256, 16, None, 50.0), (6, 1, 36, 4, 7, 30.0)],
)
@pytest.mark.parametrize("threads", [1, 2])
@needs_kernel
def test_fused_rope_decode_step_equals_rotary_then_attend(num_heads, num_kv_heads, head_dim, block_size, window,
                                                         softcap, threads, isa):
    from selfhost.layers.rotary import apply_rotary

    lens = [1, 5, 16, 17, 33, 100, 64]
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(3)
    cos = torch.randn(len(lens), 1, head_dim, generator=gen)
    sin = torch.randn(len(lens), 1, head_dim, generator=gen)
    caches, outs = [], []
    for fused in (True, False):
        cache, meta, tables, q, k, v = random_step(num_heads, num_kv_heads, head_dim, block_size, lens, seed=11)
        cache.meta = meta
        meta.num_threads = threads
        heads = torch.cat([q, k, v], dim=1)  # the unrotated projection, as Attention has it
        if fused:
            out = cache.rope_attend(1, heads, cos, sin, num_heads, scale, window, softcap)
        else:
            rotated = apply_rotary(heads[:, : num_heads + num_kv_heads], cos, sin)
            out = cache.attend(1, rotated[:, :num_heads], rotated[:, num_heads:], v, scale, window, softcap)
        caches.append(cache)
        outs.append(out)
    # The rotation matches torch's bit for bit (a prompt chunk and a decode step must
    # write the same key, or recomputation after preemption could change a greedy pick).
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert (outs[0] - outs[1]).abs().max() < 1e-6


@needs_kernel
def test_fused_step_declines_partial_rotary_and_soft_capped_prompt_chunks():
    cache, meta, tables, q, k, v = random_step(4, 2, 64, 16, [5, 9], seed=1)
    heads = torch.cat([q, k, v], dim=1)
    cache.meta = meta
    assert cache.rope_attend(0, heads, torch.ones(2, 1, 32), torch.zeros(2, 1, 32), 4, 0.1, None, None) is None
    meta.chunks = [(2, 3, 0, torch.tensor([1]))]
    assert cache.rope_attend(0, heads, torch.ones(2, 1, 64), torch.zeros(2, 1, 64), 4, 0.1, None, 30.0) is None


needs_prefill_kernel = pytest.mark.skipif(
    not paged_cache.PREFILL_KERNEL_ENABLED, reason="needs the AVX-512 prefill kernel and an AVX-512 CPU"
)


def chunk_step(num_heads, num_kv_heads, head_dim, block_size, chunks, seed, kv_dtype=torch.float32):
    """A cache plus one step of prompt chunks (start, count) with their keys already written."""
    cache, tables, gen = random_cache(num_kv_heads, head_dim, block_size, [s + c for s, c in chunks], seed, kv_dtype)
    step_chunks, slots, first = [], [], 0
    for (start, count), table in zip(chunks, tables):
        step_chunks.append((first, count, start, torch.tensor(table)))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + count)]
        first += count
    meta = StepMetadata(slot_mapping=torch.tensor(slots), num_single=0, single_block_tables=None,
                        single_context_lens=None, chunks=step_chunks)
    q = torch.randn(first, num_heads, head_dim, generator=gen)
    k = torch.randn(first, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(first, num_kv_heads, head_dim, generator=gen)
    return cache, meta, q, k, v


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,window",
    [(9, 3, 64, 16, None), (8, 8, 128, 16, None), (4, 2, 32, 8, 20), (16, 1, 64, 4, 7), (6, 2, 96, 16, 100)],
)
@pytest.mark.parametrize("threads", [1, 2])
@needs_prefill_kernel
def test_prefill_kernel_matches_torch_path(num_heads, num_kv_heads, head_dim, block_size, window, threads):
    # Whole prompts, chunks that continue a cached prefix, odd sizes past every block edge.
    chunks = [(0, 1), (0, 37), (50, 13), (0, 100), (129, 70), (16, 16)]
    scale = head_dim**-0.5
    results = {}
    for use_kernel in (True, False):
        cache, meta, q, k, v = chunk_step(num_heads, num_kv_heads, head_dim, block_size, chunks, seed=5)
        cache.use_prefill_kernel = use_kernel
        cache.meta = meta
        meta.num_threads = threads
        results[use_kernel] = cache.attend(1, q, k, v, scale, window, None)
    assert (results[True] - results[False]).abs().max() < 2e-5


@needs_prefill_kernel
def test_prefill_kernel_reads_strided_queries():
    # Attention.forward hands over q as a view into the rotated q|k tensor.
    cache, meta, q, k, v = chunk_step(6, 2, 64, 16, [(0, 40), (10, 9)], seed=2)
    cache.meta = meta
    wide = torch.cat([q, k], dim=1)
    strided = wide[:, :6]
    assert not strided.is_contiguous()
    got = cache.attend(0, strided, k, v, 0.125, None, None)
    cache.use_prefill_kernel = False
    assert (got - cache.attend(0, q, k, v, 0.125, None, None)).abs().max() < 2e-5


# ---- a bf16 cache under fp32 activations -------------------------------------------------

needs_bf16_kernels = pytest.mark.skipif(
    not paged_cache.narrow_cache_kernels_available(), reason="the kernels take a bf16 cache on AVX-512 CPUs only"
)
needs_int8_kernels = pytest.mark.skipif(
    not paged_cache.narrow_cache_kernels_available(torch.int8),
    reason="the kernels take an int8 cache on CPUs with AVX-512 BW, VL and VNNI only",
)


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_bf16_kernels), False], ids=["kernel", "torch"])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,window,softcap",
    [(9, 3, 64, 16, None, None), (8, 8, 128, 16, None, None), (8, 4, 256, 16, None, 50.0), (4, 2, 64, 16, 20, None)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_cache_decode_matches_reference_over_the_rounded_cache(use_kernel, num_heads, num_kv_heads, head_dim,
                                                                   block_size, window, softcap, threads):
    lens = [1, 5, 16, 17, 33, 100, 64]
    scale = head_dim**-0.5
    cache, meta, tables, q, k, v = random_step(num_heads, num_kv_heads, head_dim, block_size, lens, seed=7,
                                               kv_dtype=torch.bfloat16)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert cache.use_cpu_kernel == paged_cache.narrow_cache_kernels_available()
    cache.use_cpu_kernel = use_kernel
    cache.meta = meta
    meta.num_threads = threads
    got = cache.attend(1, q, k, v, scale, window, softcap)
    assert got.dtype == torch.float32
    # This step's keys and values went in rounded to nearest even, as torch rounds.
    slot = meta.slot_mapping[3].item()
    assert torch.equal(cache.v[1].flatten(1, 2)[:, slot], v[3].to(torch.bfloat16))
    expected = plain_attention(cache, 1, tables, lens, q, scale, window, softcap)
    assert (got - expected).abs().max() < 1e-5


def fused_and_torch_steps(num_heads, num_kv_heads, head_dim, window, softcap, kv_dtype, prepare=None):
    """One decode step of 7 sequences through the fused C kernel (rotary, cache write, attention) and
    through torch's rotary and the torch path, over the same random cache: ([fused cache, torch cache],
    [their outputs], the torch run's rotated queries). `prepare(cache, meta, k, v)` edits each run's
    inputs first."""
    from selfhost.layers.rotary import apply_rotary

    lens = [1, 5, 16, 17, 33, 100, 64]
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(3)
    cos = torch.randn(len(lens), 1, head_dim, generator=gen)
    sin = torch.randn(len(lens), 1, head_dim, generator=gen)
    caches, outs = [], []
    for fused in (True, False):
        cache, meta, tables, q, k, v = random_step(num_heads, num_kv_heads, head_dim, 16, lens, seed=11,
                                                   kv_dtype=kv_dtype)
        if prepare is not None:
            prepare(cache, meta, k, v)
        cache.meta = meta
        heads = torch.cat([q, k, v], dim=1)
        if fused:
            out = cache.rope_attend(1, heads, cos, sin, num_heads, scale, window, softcap)
        else:
            rotated = apply_rotary(heads[:, : num_heads + num_kv_heads], cos, sin)
            cache.use_cpu_kernel = False
            out = cache.attend(1, rotated[:, :num_heads], rotated[:, num_heads:], v, scale, window, softcap)
        caches.append(cache)
        outs.append(out)
    return caches, outs, rotated[:, :num_heads]


@needs_bf16_kernels
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,softcap", [(9, 3, 64, None, None), (8, 4, 128, 20, 30.0)])
def test_bf16_cache_fused_step_rounds_like_torch(num_heads, num_kv_heads, head_dim, window, softcap):
    def special_values(cache, meta, k, v):  # NaN, inf, ties to even
        v[0, 0, :4] = torch.tensor([float("nan"), float("inf"), 1 + 2**-8, 1 + 3 * 2**-8])

    caches, outs, _ = fused_and_torch_steps(num_heads, num_kv_heads, head_dim, window, softcap, torch.bfloat16,
                                            special_values)
    # The C writer rounds exactly as torch does: the same cache bits, but for NaN's payload
    # (torch's own scalar and vector conversions write different NaNs).
    for fused_cache, torch_cache in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        nan = fused_cache.isnan()
        assert torch.equal(nan, torch_cache.isnan()) and nan.sum() == (1 if fused_cache is caches[0].v else 0)
        assert torch.equal(fused_cache.view(torch.int16)[~nan], torch_cache.view(torch.int16)[~nan])
    finite = list(range(1, outs[0].shape[0]))  # sequence 0 has the NaN
    assert (outs[0][finite] - outs[1][finite]).abs().max() < 1e-5


@needs_bf16_kernels
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,window",
                         [(9, 3, 64, 16, None), (8, 8, 128, 16, None), (6, 2, 96, 16, 100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_cache_prefill_kernel_matches_torch_path(num_heads, num_kv_heads, head_dim, block_size, window, threads):
    chunks = [(0, 1), (0, 37), (50, 13), (0, 100), (129, 70), (16, 16)]
    scale = head_dim**-0.5
    results = {}
    for use_kernel in (True, False):
        cache, meta, q, k, v = chunk_step(num_heads, num_kv_heads, head_dim, block_size, chunks, seed=5,
                                          kv_dtype=torch.bfloat16)
        assert cache.use_prefill_kernel
        cache.use_prefill_kernel = use_kernel
        cache.use_prefill_tiles = False  # the AVX-512 kernel: exact fp32 arithmetic (tiles: below)
        cache.meta = meta
        meta.num_threads = threads
        results[use_kernel] = cache.attend(1, q, k, v, scale, window, None)
    assert (results[True] - results[False]).abs().max() < 2e-5


def tiles_and_exact(cache, meta, q, k, v, scale, window, threads):
    """The step's prompt attention on AMX tiles, then exact (AVX-512 kernel off too: the torch path) over
    the same bf16-rounded queries; the cache is left on the torch path."""
    assert cache.use_prefill_tiles
    cache.meta = meta
    meta.num_threads = threads
    got = cache.attend(1, q, k, v, scale, window, None)
    cache.use_prefill_kernel = cache.use_prefill_tiles = False
    return got, cache.attend(1, q.bfloat16().float(), k, v, scale, window, None)


needs_tiles = pytest.mark.skipif(
    not (paged_cache.narrow_cache_kernels_available() and paged_cache._prefill_attention_cpu.tiles_available()),
    reason="prompt attention on tiles needs AMX-BF16 (and the OS's grant of its state)",
)


@needs_tiles
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window",
                         [(9, 3, 64, None), (8, 8, 128, None), (6, 2, 96, 100), (4, 2, 32, 20), (16, 1, 64, 7),
                          (32, 2, 256, None)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_on_tiles_is_bf16_attention(num_heads, num_kv_heads, head_dim, window, threads):
    """On AMX the kernel rounds queries and probabilities to bf16 and sums in fp32. Against
    exact attention over the same bf16-rounded queries, each output then differs by at most
    the probabilities' rounding: sum_j p_j e_j v_j / sum_j p_j with |e_j| <= 2^-9, so
    |error| <= 2^-9 max|v| (a little over for the exp's own 5e-5 and fp32 sums)."""
    # Whole prompts, chunks continuing a cached prefix, sizes past every 16-row tile, 64-query
    # unit and 128-key block edge, one long chunk that needs several key blocks per unit.
    chunks = [(0, 1), (0, 37), (50, 13), (0, 100), (129, 70), (16, 16), (300, 150)]
    scale = head_dim**-0.5
    cache, meta, q, k, v = chunk_step(num_heads, num_kv_heads, head_dim, 16, chunks, seed=5, kv_dtype=torch.bfloat16)
    got, want = tiles_and_exact(cache, meta, q, k, v, scale, window, threads)
    bound = 2**-9 * v.bfloat16().float().abs().max().item()
    error = (got - want).abs().max().item()
    assert error <= 1.05 * bound + 1e-5
    assert error > 0  # it did round: these are not the exact kernel's outputs
    assert (got - cache.attend(1, q, k, v, scale, window, None)).abs().max() > 1e-4


@needs_tiles
def test_tiles_refuse_an_fp32_cache():
    cache, meta, q, k, v = chunk_step(9, 3, 64, 16, [(0, 40)], seed=1)
    assert not cache.use_prefill_tiles
    cache.use_prefill_tiles = True
    cache.meta = meta
    with pytest.raises(ValueError, match="tiles need AMX, a bf16 or int8 cache"):
        cache.attend(0, q, k, v, 0.125, None, None)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 2, 32, 4)])
@needs_kernel
def test_fused_step_with_a_verification_sees_its_own_earlier_keys(num_heads, num_kv_heads, head_dim, block_size,
                                                                   threads, isa):
    """A speculative verification enters as one single-token query per position of one sequence: with
    store_first every key is written before any query attends, so query i sees keys i' < i of the step."""
    from selfhost.layers.rotary import apply_rotary

    seq_lens, checked = [40, 9, 70], [4, 1, 6]  # context after the step, and how many of its last tokens are queries
    # Latest position first: without store_first, the first query attended would read slots no one wrote yet.
    lens = [n - i for n, c in zip(seq_lens, checked) for i in range(c)]
    owner = [s for s, c in enumerate(checked) for _ in range(c)]
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(5)
    cos = torch.randn(len(lens), 1, head_dim, generator=gen)
    sin = torch.randn(len(lens), 1, head_dim, generator=gen)
    heads = torch.randn(len(lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    outs, caches = [], []
    for fused in (True, False):
        cache, seq_tables, _ = random_cache(num_kv_heads, head_dim, block_size, seq_lens, seed=13)
        tables = [seq_tables[s] for s in owner]
        max_blocks = max(len(t) for t in tables)
        cache.meta = StepMetadata(
            slot_mapping=torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                                       for t, n in zip(tables, lens)]),
            num_single=len(lens), single_block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
            single_context_lens=torch.tensor(lens), chunks=[], num_threads=threads, store_first=True,
        )
        if fused:
            out = cache.rope_attend(0, heads, cos, sin, num_heads, scale, None, None)
        else:
            rotated = apply_rotary(heads[:, : num_heads + num_kv_heads], cos, sin)
            out = cache.attend(0, rotated[:, :num_heads], rotated[:, num_heads:], heads[:, num_heads + num_kv_heads:],
                               scale, None, None)
        outs.append(out)
        caches.append(cache)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def mixed_step(num_heads, num_kv_heads, head_dim, block_size, single_lens, chunks, seed, kv_dtype):
    """A cache plus one step of single-token queries (sequences of `single_lens` tokens, the last
    one new) followed by prompt chunks (start, count), none of the step's keys written yet."""
    lens = list(single_lens) + [s + c for s, c in chunks]
    cache, tables, gen = random_cache(num_kv_heads, head_dim, block_size, lens, seed, kv_dtype)
    slot = lambda table, p: table[p // block_size] * block_size + p % block_size  # noqa: E731
    single_tables = tables[: len(single_lens)]
    max_blocks = max(len(t) for t in single_tables)
    slots = [slot(t, n - 1) for t, n in zip(single_tables, single_lens)]
    step_chunks, first = [], len(single_lens)
    for (start, count), table in zip(chunks, tables[len(single_lens):]):
        step_chunks.append((first, count, start, torch.tensor(table)))
        slots += [slot(table, p) for p in range(start, start + count)]
        first += count
    meta = StepMetadata(slot_mapping=torch.tensor(slots), num_single=len(single_lens),
                        single_block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in single_tables]),
                        single_context_lens=torch.tensor(single_lens), chunks=step_chunks)
    heads = torch.randn(first, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    return cache, meta, heads, gen


@pytest.mark.parametrize("kv_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_kernels),
                                      pytest.param(torch.int8, marks=needs_int8_kernels)], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,window",
                         [(9, 3, 64, 16, None), (8, 2, 128, 16, 40), (4, 4, 64, 32, None), (4, 2, 80, 16, None)])
@pytest.mark.parametrize("threads", [1, 2])
@needs_prefill_kernel
def test_fused_prompt_step_equals_rotary_then_attend(kv_dtype, num_heads, num_kv_heads, head_dim, block_size, window,
                                                     threads):
    from selfhost.layers.rotary import apply_rotary

    single_lens, chunks = [1, 17, 40], [(0, 37), (50, 13), (16, 70)]
    scale = head_dim**-0.5
    caches, outs = [], []
    for fused in (True, False):
        cache, meta, heads, gen = mixed_step(num_heads, num_kv_heads, head_dim, block_size, single_lens, chunks,
                                             seed=4, kv_dtype=kv_dtype)
        cos = torch.randn(heads.shape[0], 1, head_dim, generator=gen)
        sin = torch.randn(heads.shape[0], 1, head_dim, generator=gen)
        cache.meta = meta
        meta.num_threads = threads
        if fused:
            out = cache.rope_attend(1, heads, cos, sin, num_heads, scale, window, None)
            assert out is not None
        else:
            rotated = apply_rotary(heads[:, : num_heads + num_kv_heads], cos, sin)
            out = cache.attend(1, rotated[:, :num_heads], rotated[:, num_heads:], heads[:, num_heads + num_kv_heads:],
                               scale, window, None)
        caches.append(cache)
        outs.append(out)
    # Keys and values land in the same slots with the same bits (rotation and rounding as torch's; an
    # int8 cache's scales too), and the attention is the same kernels' over the same cache and queries.
    # The prompt chunks start inside blocks (50, 16 + 70), so the C writer's runs of a block's tokens
    # (engine/_rope_store_avx512.h) start and end at any column.
    for name in ("k", "v") + (("k_scale", "v_scale") if kv_dtype == torch.int8 else ()):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    assert torch.equal(outs[0], outs[1])


def verification_step(num_heads, num_kv_heads, head_dim, block_size, queries, kv_dtype, seed):
    """A step of a decode query, a verification (`queries` consecutive positions of one sequence, one more
    key each, the sequence's table for all), and another decode query; keys and values random."""
    lens = [23, 40, 70]  # keys already in the cache (the verification's: up to its first query's)
    cache, tables, gen = random_cache(num_kv_heads, head_dim, block_size,
                                      [lens[0], lens[1] + queries + block_size, lens[2]], seed, kv_dtype)
    rows = [(0, lens[0])] + [(1, lens[1] + i) for i in range(queries)] + [(2, lens[2])]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    step = dict(slots=[tables[s][(n - 1) // block_size] * block_size + (n - 1) % block_size for s, n in rows],
                tables=[padded[s] for s, _ in rows], lens=[n for _, n in rows])
    heads = torch.randn(len(rows), num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    cos = torch.randn(len(rows), 1, head_dim, generator=gen)
    sin = torch.randn(len(rows), 1, head_dim, generator=gen)
    return cache, step, heads, cos, sin


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window,softcap,queries",
                         [(9, 3, 64, None, None, 5), (4, 4, 32, None, 30.0, 9), (8, 2, 64, 60, None, 7),
                          (4, 2, 32, None, None, 20)])
@pytest.mark.parametrize("threads", [1, 2])
@needs_kernel
def test_a_verification_attends_as_its_queries_one_by_one(kv_dtype, num_heads, num_kv_heads, head_dim, window, softcap,
                                                          queries, threads):
    """A verification's queries (store_first) are read as one group over the keys (AVX-512, fp32 or bf16
    cache, no window cut; groups of at most 16): the same outputs, bit for bit, as each query in a step
    of its own after the ones before it, over any cache."""
    if kv_dtype != torch.float32 and not paged_cache.narrow_cache_kernels_available(kv_dtype):
        pytest.skip("this CPU has no kernels for a narrow cache")
    block_size, scale = 16, head_dim**-0.5
    outs, caches = [], []
    for together in (True, False):
        cache, step, heads, cos, sin = verification_step(num_heads, num_kv_heads, head_dim, block_size, queries,
                                                         kv_dtype, seed=5)
        singles = [range(len(step["lens"]))] if together else [[r] for r in range(len(step["lens"]))]
        out = []
        for rows in singles:
            rows = list(rows)
            cache.meta = StepMetadata(
                slot_mapping=torch.tensor([step["slots"][r] for r in rows]), num_single=len(rows),
                single_block_tables=torch.tensor([step["tables"][r] for r in rows]),
                single_context_lens=torch.tensor([step["lens"][r] for r in rows]), chunks=[],
                num_threads=threads, store_first=together)
            out.append(cache.rope_attend(1, heads[rows], cos[rows], sin[rows], num_heads, scale, window, softcap))
        outs.append(torch.cat(out))
        caches.append(cache)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(outs[0], outs[1])
