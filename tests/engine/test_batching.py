"""Continuous batching, paged KV cache, preemption and prefix caching give the same tokens as running alone."""

import random

import pytest

from selfhost import LLM, SamplingParams
from selfhost.engine.paged_cache import PagedKVCache


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint("qwen2"))


def workload(n=20, seed=0, vocab=512):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 70))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


def run_alone(llm, prompts, params):
    return [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]


def run_staggered(llm, prompts, params, arrivals_per_step=3):
    """Requests arrive a few per step while earlier ones are mid-prefill or mid-decode."""
    engine = llm.engine
    pending = list(zip(range(len(prompts)), prompts, params))
    seqs = {}
    while pending or engine.has_work:
        for _ in range(arrivals_per_step):
            if pending:
                i, p, sp = pending.pop(0)
                seqs[i] = engine.add_request(f"r{i}", p, sp)
        engine.step()
    assert all(s.is_finished for s in seqs.values())
    return [seqs[i].output_ids for i in range(len(prompts))]


def assert_no_blocks_in_use(llm):
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


# The int8 KV cache rounds each token's key and value on its own, whatever the batch or the chunk.
KV_CACHE_DTYPES = pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])


@KV_CACHE_DTYPES
def test_batched_greedy_equals_alone_whatever_the_batch(checkpoint, kv_cache_dtype):
    prompts, params = workload()
    # A small token budget forces chunked prefill next to running decodes.
    llm = LLM(checkpoint, max_num_batched_tokens=48, max_num_seqs=8, kv_cache_memory="4MiB",
              kv_cache_dtype=kv_cache_dtype)
    alone = run_alone(llm, prompts, params)
    assert run_staggered(llm, prompts, params) == alone
    assert [o.token_ids for o in llm.generate(prompts, params[0])] == run_alone(llm, prompts, [params[0]] * 20)
    assert_no_blocks_in_use(llm)


def test_seeded_sampling_is_independent_of_the_batch(checkpoint):
    llm = LLM(checkpoint, kv_cache_memory="4MiB")
    prompts, _ = workload(8, seed=1)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True) for i in range(8)]
    assert run_staggered(llm, prompts, params, arrivals_per_step=2) == run_alone(llm, prompts, params)


@KV_CACHE_DTYPES
def test_preemption_completes_everything_unchanged(checkpoint, kv_cache_dtype):
    prompts, params = workload(12, seed=2)
    roomy = LLM(checkpoint, kv_cache_memory="8MiB", kv_cache_dtype=kv_cache_dtype)
    expected = run_staggered(roomy, prompts, params)
    # Room for only ~128 tokens of KV: far less than the requests need together.
    tight = LLM(checkpoint, kv_cache_memory=128 * tight_bytes_per_token(roomy), max_num_seqs=12,
                kv_cache_dtype=kv_cache_dtype)
    assert tight.engine.capacity_tokens == 128
    assert run_staggered(tight, prompts, params, arrivals_per_step=12) == expected
    assert tight.engine.stats().num_preemptions > 0
    assert_no_blocks_in_use(tight)


def tight_bytes_per_token(llm):
    return PagedKVCache.bytes_per_block(llm.model.spec, 1, llm.kv_cache_dtype)


@KV_CACHE_DTYPES
def test_prefix_cache_hit_and_unchanged_outputs(checkpoint, kv_cache_dtype):
    prefix = list(range(10, 10 + 96))  # six full blocks of 16
    a, b = prefix + [200, 201, 202], prefix + [300, 301]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cold = LLM(checkpoint, kv_cache_memory="4MiB", enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    expected = [cold.generate([p], params)[0].token_ids for p in (a, b)]

    llm = LLM(checkpoint, kv_cache_memory="4MiB", kv_cache_dtype=kv_cache_dtype)
    first_output = llm.generate([a], params)[0]
    first = first_output.token_ids
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hit_tokens
    second_output = llm.generate([b], params)[0]
    second = second_output.token_ids
    assert bm.prefix_hit_tokens - hits_before == 96
    assert (first_output.num_cached_tokens, second_output.num_cached_tokens) == (0, 96)
    assert [first, second] == expected
    assert llm.engine.stats().prefix_hit_rate > 0
    assert_no_blocks_in_use(llm)


def test_eviction_under_pressure_keeps_outputs(checkpoint):
    prompts, params = workload(16, seed=3)
    expected = run_alone(LLM(checkpoint, kv_cache_memory="8MiB", enable_prefix_caching=False), prompts, params)
    small = LLM(checkpoint, kv_cache_memory=160 * tight_bytes_per_token(LLM(checkpoint, kv_cache_memory="1MiB")))
    # Run twice: the second pass hits blocks cached by the first, or finds them evicted.
    assert run_alone(small, prompts, params) == expected
    assert run_staggered(small, prompts + prompts, params + params, 4) == expected + expected
    assert_no_blocks_in_use(small)


def test_abort_mid_prefill_and_mid_decode_frees_blocks(checkpoint):
    llm = LLM(checkpoint, kv_cache_memory="4MiB", max_num_batched_tokens=32)
    engine = llm.engine
    long_prompt = list(range(3, 3 + 100))
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    decoding = engine.add_request("decode", [5, 6, 7], params)
    prefilling = engine.add_request("prefill", long_prompt, params)
    waiting = engine.add_request("waiting", [8, 9], params)
    engine.step()
    engine.step()
    assert 0 < prefilling.num_computed_tokens < len(long_prompt)  # still mid-prefill
    assert len(decoding.output_ids) >= 1  # already decoding
    assert engine.stats().kv_blocks_used > 0
    for rid in ("prefill", "decode", "waiting"):
        engine.abort(rid)
    assert waiting.finish_reason == "abort"
    assert_no_blocks_in_use(llm)
    # The engine keeps serving after aborts.
    assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 50


def test_request_larger_than_cache_is_refused(checkpoint):
    from selfhost.errors import InvalidParameterError

    llm = LLM(checkpoint, kv_cache_memory=64 * tight_bytes_per_token(LLM(checkpoint, kv_cache_memory="1MiB")))
    with pytest.raises(InvalidParameterError, match="KV cache"):
        llm.generate([list(range(3, 60))], SamplingParams(max_tokens=20))
    assert_no_blocks_in_use(llm)
