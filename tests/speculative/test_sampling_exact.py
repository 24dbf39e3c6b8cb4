"""With temperature > 0, speculation leaves the output distribution exactly the target's.

A chi-squared test of the joint frequencies of the first three sampled tokens against their
exact probabilities, computed with transformers' forward pass (temperature, then top-k), at
0.1% significance over deterministic seeds. Proposals come from prompt lookup on a prompt the
model itself wrote (so they are often accepted) and from a noisy copy of the model; both
accepted and rejected proposals occur, and a verification can keep two proposals at once.
"""

from __future__ import annotations


import pytest
import torch
from scipy.stats import chi2

from selfhost import LLM, SamplingParams
from selfhost.speculative.config import SpeculativeConfig
from selfhost.speculative.speculator import Speculator
from tests.speculative.conftest import always

TEMPERATURE, TOP_K, NUM_SAMPLES, SIGNIFICANCE = 1.0, 4, 3000, 1e-3


@pytest.fixture(scope="module")
def noisy_draft(noisy_copy, target):
    return noisy_copy(target, noise=0.3, seed=3)


@pytest.fixture(scope="module")
def prompt(target):
    """The model's own greedy text: prompt lookup then proposes what the model finds likely."""
    seed_text = [5, 17, 99, 230, 41]
    out = LLM(target).generate([seed_text], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    return seed_text + out.token_ids


def exact_joint(target: str, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under temperature and top-k sampling, from transformers' forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    @torch.no_grad()
    def next_probs(tokens: list[int]) -> dict[int, float]:
        logits = model(torch.tensor([tokens])).logits[0, -1] / TEMPERATURE
        top = logits.topk(TOP_K)
        probs = top.values.softmax(-1)
        return dict(zip(top.indices.tolist(), probs.tolist()))

    joint = {}
    for t1, p1 in next_probs(prompt).items():
        for t2, p2 in next_probs(prompt + [t1]).items():
            for t3, p3 in next_probs(prompt + [t1, t2]).items():
                joint[(t1, t2, t3)] = p1 * p2 * p3
    return joint


def sample_triples(llm: LLM, prompt: list[int]) -> dict[tuple[int, ...], int]:
    # max_tokens=4: the second step may propose two tokens, so t2 and t3 can both come from one verification.
    engine = llm.engine
    seqs = [engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=4, temperature=TEMPERATURE, top_k=TOP_K,
                                                                seed=i, ignore_eos=True))
            for i in range(NUM_SAMPLES)]
    while engine.has_work:
        engine.step()
    counts: dict[tuple[int, ...], int] = {}
    for seq in seqs:
        key = tuple(seq.output_ids[:3])
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi_squared_p_value(counts: dict, probs: dict) -> float:
    """Pearson's test; outcomes expected fewer than 5 times are pooled into one bin."""
    assert set(counts) <= set(probs), "a sampled sequence the target cannot produce"
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for key, p in probs.items():
        e = p * NUM_SAMPLES
        if e < 5:
            pooled_o, pooled_e = pooled_o + counts.get(key, 0), pooled_e + e
        else:
            observed.append(counts.get(key, 0))
            expected.append(e)
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(chi2.sf(statistic, len(observed) - 1))


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_sampled_output_follows_the_targets_distribution(target, noisy_draft, prompt, proposer):
    if proposer == "ngram":
        llm = LLM(target, speculative="ngram", max_num_seqs=128, kv_cache_memory="16MiB")
        # Look-up from one matching token: every step has a proposal to accept or reject.
        llm.engine.speculator = Speculator(SpeculativeConfig("ngram", 2, ngram_min=1, ngram_max=2, when="always"))
    else:
        llm = always(LLM(target, speculative=f"draft:{noisy_draft}", num_speculative_tokens=2, max_num_seqs=128,
                         kv_cache_memory="16MiB"))
    counts = sample_triples(llm, prompt)
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_proposed_tokens  # proposals both kept and rejected
    assert chi_squared_p_value(counts, exact_joint(target, prompt)) > SIGNIFICANCE


def test_the_test_tells_a_wrong_distribution_apart(target, prompt):
    """The same test rejects samples drawn at another temperature: it has the power to fail."""
    llm = LLM(target, max_num_seqs=128, kv_cache_memory="16MiB")
    engine = llm.engine
    seqs = [engine.add_request(f"w{i}", prompt, SamplingParams(max_tokens=3, temperature=0.3, top_k=TOP_K, seed=i,
                                                                ignore_eos=True)) for i in range(NUM_SAMPLES)]
    while engine.has_work:
        engine.step()
    counts: dict = {}
    for seq in seqs:
        counts[tuple(seq.output_ids)] = counts.get(tuple(seq.output_ids), 0) + 1
    assert chi_squared_p_value(counts, exact_joint(target, prompt)) < SIGNIFICANCE


def test_seeded_speculative_sampling_is_reproducible(target, prompt):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(target, speculative="ngram")
        llm.engine.speculator = Speculator(SpeculativeConfig("ngram", 4, ngram_min=1, when="always"))
        runs.append(llm)
    assert runs[0].generate([prompt], params)[0].token_ids == runs[1].generate([prompt], params)[0].token_ids
    assert runs[0].engine.stats().spec_verifications > 0
    # Under the measured policy a seeded request does not speculate: the same tokens as without it.
    measured = LLM(target, speculative="ngram")
    assert measured.generate([prompt], params)[0].token_ids == LLM(target).generate([prompt], params)[0].token_ids
    assert measured.engine.stats().spec_verifications == 0
