"""Speculative decoding inside the batching engine: the same outputs as without it, and the cache rolled back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError
from tests.engine.test_batching import run_staggered
from tests.speculative.conftest import always
from tests.tiny_models import make_tiny_checkpoint, make_tiny_model


@pytest.fixture(scope="module")
def draft(noisy_copy, target):
    """The target with noise on its weights: it agrees with the target often, not always."""
    return noisy_copy(target, noise=0.5, seed=7)


@pytest.fixture(scope="module")
def plain(target):
    return LLM(target, kv_cache_memory="4MiB")


def workload(n=16, seed=0, vocab=512):
    """Prompts that repeat themselves (so prompt lookup has something to copy) and random lengths."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        motif = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        prompts.append((motif * rng.randint(1, 8))[: rng.randint(3, 80)])
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


def run_batch(llm, prompts, params):
    """Every request queued at once (each with its own params); their outputs once all are done."""
    seqs = [llm.engine.add_request(f"b{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    while llm.engine.has_work:
        llm.engine.step()
    return [seq.to_output() for seq in seqs]


def alone(llm, prompts, params):
    return [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_token_for_token_the_same(target, draft, plain, method):
    prompts, params = workload()
    expected = alone(plain, prompts, params)
    speculative = "ngram" if method == "ngram" else f"draft:{draft}"
    # A small step budget: chunked prefill beside verifications; a small cache: preemption.
    llm = always(LLM(target, speculative=speculative, num_speculative_tokens=4, max_num_batched_tokens=40,
                     max_num_seqs=8, kv_cache_memory="96KiB"))
    assert run_staggered(llm, prompts, params) == expected
    stats = llm.engine.stats()
    assert stats.spec_verifications > 0
    assert 0 < stats.spec_acceptance_rate < 1, stats  # both outcomes occurred
    assert stats.num_preemptions > 0  # the cache was small enough to preempt mid-run
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    # All at once, twice: the second time the prompts' blocks come from the prefix cache.
    llm = always(LLM(target, speculative=speculative, kv_cache_memory="4MiB"))
    assert [o.token_ids for o in run_batch(llm, prompts, params)] == expected
    assert [o.token_ids for o in run_batch(llm, prompts, params)] == expected  # now from cached prefixes
    assert llm.engine.stats().prefix_hit_rate > 0


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(target):
    llm = always(LLM(target, speculative=f"draft:{target}", num_speculative_tokens=3, kv_cache_memory="4MiB"))
    prompts, params = workload(6, seed=3)
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)] * len(prompts)
    outputs = run_batch(llm, prompts, params)
    stats = llm.engine.stats()
    assert stats.spec_acceptance_rate == 1.0 and stats.spec_verifications > 0
    assert stats.spec_mean_accepted_length > 3  # up to 3 accepted + the target's own token
    assert [o.token_ids for o in outputs] == [o.token_ids for o in LLM(target).generate(prompts, params[0])]


def test_stop_strings_and_max_tokens_inside_an_accepted_run(target, plain):
    """The text and finish reason are those of the plain run, wherever the stop falls in a verified run."""
    prompts, _ = workload(10, seed=5)
    base = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = plain.generate(prompts, base)
    cases = []
    for prompt, out in zip(prompts, full):
        if len(out.text) > 12:
            middle = len(out.text) // 2
            cases.append((prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                 stop=(out.text[middle:middle + 3],))))
        cases.append((prompt, SamplingParams(max_tokens=len(out.token_ids) // 2 + 1, temperature=0, ignore_eos=True)))
    llm = always(LLM(target, speculative="ngram", num_speculative_tokens=6, kv_cache_memory="4MiB"))
    got = run_batch(llm, [p for p, _ in cases], [sp for _, sp in cases])
    want = [plain.generate([p], sp)[0] for p, sp in cases]
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == [
        (o.text, o.token_ids, o.finish_reason) for o in want]
    assert any(o.finish_reason == "stop" for o in got)
    assert llm.engine.stats().spec_accepted_tokens > 0


def test_rejected_proposals_leave_the_blocks_of_a_plain_run(target, draft):
    """After every step, the blocks in use equal those a plain run holds at the same length."""
    prompt = list(range(5, 40))
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    blocks_at_length = {}
    plain_llm = LLM(target, kv_cache_memory="4MiB", enable_prefix_caching=False)
    seq = plain_llm.engine.add_request("p", prompt, params)
    while plain_llm.engine.has_work:
        plain_llm.engine.step()
        blocks_at_length[seq.num_tokens] = plain_llm.engine.stats().kv_blocks_used
    llm = always(LLM(target, speculative=f"draft:{draft}", num_speculative_tokens=5, kv_cache_memory="4MiB",
                     enable_prefix_caching=False))
    seq = llm.engine.add_request("s", prompt, params)
    checked = 0
    while llm.engine.has_work:
        llm.engine.step()
        if not seq.is_finished:
            assert llm.engine.stats().kv_blocks_used == blocks_at_length[seq.num_tokens]
            checked += 1
    stats = llm.engine.stats()
    assert checked > 5 and stats.spec_proposed_tokens > stats.spec_accepted_tokens  # some were rejected
    assert stats.kv_blocks_used == 0


def test_requests_that_cannot_speculate_still_match(target, plain):
    """Penalties, logprobs and output constraints beside speculating requests in one batch."""
    prompts, _ = workload(4, seed=9)
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2),
    ]
    want = [plain.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    got = run_batch(always(LLM(target, speculative="ngram", kv_cache_memory="4MiB")), prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want):
        if w.logprobs is not None:
            assert [t.token_id for t in g.logprobs] == [t.token_id for t in w.logprobs]
            for a, b in zip(g.logprobs, w.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert list(a.top) == list(b.top)


def test_bad_settings_are_refused_clearly(target, tmp_path):
    with pytest.raises(InvalidParameterError, match="num_speculative_tokens"):
        LLM(target, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(InvalidParameterError, match="ngram.*draft"):
        LLM(target, speculative="medusa")
    with pytest.raises(InvalidParameterError, match="path"):
        LLM(target, speculative="draft:")
    other_vocab = make_tiny_checkpoint("llama", tmp_path / "other", num_hidden_layers=1, vocab_size=640)
    with pytest.raises(InvalidParameterError, match="different vocabularies"):
        LLM(target, speculative=f"draft:{other_vocab}")
    # Same vocabulary size, different tokenizer: refused too.
    odd = make_tiny_model("llama", tmp_path / "odd", num_hidden_layers=1)
    from tests.tiny_models import save_tiny_tokenizer

    save_tiny_tokenizer(odd, vocab_size=300)
    with pytest.raises(InvalidParameterError, match="different tokenizers"):
        LLM(target, speculative=f"draft:{odd}")


@pytest.mark.parametrize("model", ["demo", "tiny"])
def test_a_verified_run_decodes_to_the_text_of_its_tokens_appended_one_by_one(model, target):
    """Sequence.extend (one decode for a run) against append per token: the same text, streamed deltas and
    finish, over random runs (byte-level tokens split UTF-8 characters), max_tokens and stop tokens inside runs."""
    from selfhost.engine.sequence import Sequence
    from selfhost.hub import resolve_model
    from selfhost.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model(None) if model == "demo" else Path(target))
    vocab = len(tokenizer.hf)
    rng = random.Random(1)
    for trial in range(60):
        params = SamplingParams(max_tokens=rng.randint(5, 60), ignore_eos=rng.random() < 0.5)
        one, run = (Sequence("r", [1, 2], params, tokenizer, params.max_tokens) for _ in range(2))
        deltas_one, deltas_run = [], []
        while not one.is_finished:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            for token in tokens:
                one.append(token, None)
                if one.is_finished:
                    break
            run.extend(tokens, [None] * len(tokens))
            deltas_one.append(one.take_delta())
            deltas_run.append(run.take_delta())
        assert run.is_finished and run.output_ids == one.output_ids and run.finish_reason == one.finish_reason
        assert run.detok.text == one.detok.text and "".join(deltas_run) == "".join(deltas_one), trial
