"""Speculative decoding's pieces against their definitions: prompt lookup, acceptance, adaptive length."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from selfhost.speculative.adaptive import AdaptiveLength
from selfhost.speculative.ngram import NgramProposer
from selfhost.speculative.verify import accept_greedy, accept_sampled


def test_ngram_continues_the_most_recent_longest_match():
    proposer = NgramProposer(min_ngram=2, max_ngram=3)
    #            a  b  c  d  e  a  b  c  x  y  a  b  c
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 8, 9, 1, 2, 3]
    assert proposer.propose(tokens, 2) == [8, 9]  # the later "1 2 3" is followed by 8 9, not 4 5
    assert proposer.propose(tokens, 5) == [8, 9, 1, 2, 3]
    assert proposer.propose([1, 2, 3, 4], 3) == []  # no earlier occurrence of any suffix
    assert proposer.propose(tokens, 0) == []


def test_ngram_prefers_a_longer_suffix():
    proposer = NgramProposer(min_ngram=1, max_ngram=2)
    tokens = [7, 5, 1, 9, 5, 2, 7, 5]  # "7 5" occurred at 0 (-> 1); "5" alone last occurred at 4 (-> 2)
    assert proposer.propose(tokens, 1) == [1]


def test_ngram_rejects_bad_sizes():
    with pytest.raises(ValueError):
        NgramProposer(min_ngram=3, max_ngram=2)


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_adds_the_targets_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 6, 1]):
        logits[row, best] = 5.0
    assert accept_greedy(logits, [3, 4, 6]) == [3, 4, 6, 1]  # all kept, plus the free token
    assert accept_greedy(logits, [3, 9, 6]) == [3, 4]  # the first disagreement becomes the target's choice
    assert accept_greedy(logits[:1], []) == [3]  # nothing proposed: a plain decode step


def _first_token_counts(p: torch.Tensor, q: torch.Tensor | None, proposal_from_q: bool, trials: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(p.shape[1])
    for _ in range(trials):
        if proposal_from_q:
            proposed = [int(torch.multinomial(q[0], 1, generator=generator))]
        else:
            proposed = [2]  # a fixed (prompt-lookup) proposal
        counts[accept_sampled(p, proposed, q, generator)[0]] += 1
    return counts


@pytest.mark.parametrize("draft", ["model", "lookup"])
def test_rejection_sampling_gives_exactly_the_targets_distribution(draft):
    """Chi-squared test, 0.1% significance: the first token's frequencies against the target's p."""
    torch.manual_seed(0)
    vocab, trials = 6, 12000
    p = torch.softmax(torch.randn(2, vocab) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(1, vocab) * 1.5, dim=-1) if draft == "model" else None
    counts = _first_token_counts(p, q, draft == "model", trials)
    expected = p[0] * trials
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(0.999, df=vocab - 1), (counts.tolist(), expected.tolist())
    # And the test has power: the draft's own distribution is rejected by the same test.
    if q is not None:
        wrong = float(((counts - q[0] * trials) ** 2 / (q[0] * trials)).sum())
        assert wrong > chi2.ppf(0.999, df=vocab - 1)


def test_adaptive_length_backs_off_and_recovers():
    length = AdaptiveLength(max_tokens=4, smoothing=0.5, probe_every=4)
    assert length.next_length() == 4
    for _ in range(6):
        length.record(proposed=4, accepted=0)
    lengths = [length.next_length() for _ in range(8)]
    assert lengths.count(0) >= 6 and 1 in lengths  # mostly plain steps, with an occasional probe
    for _ in range(6):
        length.record(proposed=1, accepted=1)
    assert length.next_length() >= 3


def test_the_incremental_ngram_index_agrees_with_the_plain_scan():
    """Grow random low-entropy sequences a token or a few at a time; every proposal equals the definition's."""
    import random

    from selfhost.speculative.ngram import NgramIndex

    rng = random.Random(0)
    for trial in range(200):
        proposer = NgramProposer(min_ngram=rng.randint(1, 3), max_ngram=rng.randint(3, 5))
        index = NgramIndex(proposer)
        tokens = [rng.randrange(4) for _ in range(rng.randint(0, 3))]
        for _ in range(40):
            k = rng.randint(0, 5)
            assert index.propose(tokens, k) == proposer.propose(tokens, k), (tokens, k)
            if rng.random() < 0.2:  # asked again before the sequence grew (a step that did not run it)
                assert index.propose(tokens, k) == proposer.propose(tokens, k)
            tokens.extend(rng.randrange(4) for _ in range(rng.randint(1, 3)))


def test_step_cost_interpolates_and_speculation_pays_only_while_steps_are_flat():
    from selfhost.speculative.step_cost import StepCostModel, speculation_pays

    cost = StepCostModel()
    assert cost.seconds(4) is None
    assert speculation_pays(cost, 1, 4, 1, 1.5)  # nothing measured: try
    for n, seconds in [(1, 0.010), (8, 0.011), (64, 0.050), (256, 0.200)]:
        cost.record(n, seconds)
    assert cost.seconds(1) == 0.010 and cost.seconds(4) == pytest.approx(0.010 + 0.001 * 3 / 7)
    assert cost.seconds(1000) == 0.200  # flat past the largest measured step
    # One stream: 5 tokens cost about what 1 does, so 1.5 expected tokens per step is a gain.
    assert speculation_pays(cost, 1, 4, 1, 1.5)
    # ... unless the proposals themselves (a draft model's passes) cost more than they bring.
    assert not speculation_pays(cost, 1, 4, 1, 1.5, proposal_seconds=0.02)
    # 64 decoding sequences with 4 proposals each: the step is 4x the tokens at ~4x the time.
    assert not speculation_pays(cost, 64, 192, 64, 64 * 1.5)
    cost.record(1, 0.030)  # a running average, not the last value
    assert 0.010 < cost.seconds(1) < 0.030


def test_a_gain_within_the_noise_is_not_taken():
    from selfhost.speculative.step_cost import REQUIRED_GAIN, StepCostModel, speculation_pays

    cost = StepCostModel()
    cost.record(1, 0.010)
    cost.record(2, 0.010)
    assert not speculation_pays(cost, 1, 1, 1, REQUIRED_GAIN - 0.01)  # 4% more tokens at the same cost: no
    assert speculation_pays(cost, 1, 1, 1, REQUIRED_GAIN + 0.01)
