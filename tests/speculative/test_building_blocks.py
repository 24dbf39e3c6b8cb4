"""Speculative decoding's pieces against their definitions: prompt lookup, acceptance, proposal lengths."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from selfhost.speculative.adaptive import (PROBE_EVERY, AcceptanceCounts, AcceptanceModel, Candidate,
                                           expected_tokens, plan_lengths)
from selfhost.speculative.ngram import NgramProposer
from selfhost.layers.sampler import draw
from selfhost.speculative.verify import accept_argmax, accept_greedy, accept_sampled, row_argmax


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


def test_greedy_acceptance_reads_rows_lazily_and_agrees_with_torchs_argmax():
    """It stops at the first disagreement; what it returns is the definition's, ties (the first maximum) included."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(200):
        k = int(torch.randint(0, 9, (), generator=generator))
        logits = torch.randint(0, 3, (k + 1, 64), generator=generator).float()  # many ties
        best = logits.argmax(dim=-1).tolist()
        keep = int(torch.randint(0, k + 1, (), generator=generator))
        proposed = best[:keep] + [(b + 1) % 64 for b in best[keep:k]]  # agrees up to `keep`, then not
        expected = best[:keep + 1]
        assert accept_greedy(logits, proposed) == expected
        assert accept_greedy(logits.double(), proposed) == expected  # torch's own path
        assert accept_argmax(best, proposed) == expected  # from the argmax a greedy step found with the logits


def test_row_argmax_is_torchs_first_maximum():
    """numpy's argmax on CPU rows: the same index as torch's, ties (the first maximum) included."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 4096), generator=generator).float()  # many ties
    logits[3, 100] = float("inf")
    assert row_argmax(logits) == logits.argmax(dim=-1).tolist()
    wide = torch.randn(9, 4096, generator=generator)
    assert row_argmax(wide) == wide.argmax(dim=-1).tolist()
    assert row_argmax(wide.bfloat16()) == wide.bfloat16().argmax(dim=-1).tolist()  # torch's own path


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


def test_draw_follows_unnormalised_weights_and_never_picks_a_zero():
    generator = torch.Generator().manual_seed(5)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])  # 3:1, unnormalised, zeros at both ends
    trials = 8000
    counts = torch.zeros(6)
    for _ in range(trials):
        counts[draw(weights, generator)] += 1
    assert counts[[0, 2, 4, 5]].sum() == 0
    expected = torch.tensor([3 / 4, 1 / 4]) * trials
    statistic = float(((counts[[1, 3]] - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(0.999, df=1), counts.tolist()


def test_acceptance_is_counted_by_position_and_evidence():
    model, own = AcceptanceModel(), AcceptanceCounts()
    fresh = model.rates(own, "long match")
    assert fresh == [0.5] * 4  # the prior before anything is seen
    for _ in range(20):
        model.record(own, "long match", proposed=6, accepted=6)  # positions 0..5 tried and kept
        model.record(own, "short match", proposed=4, accepted=0)  # only position 0 tried, rejected
    assert min(model.rates(own, "long match")) > 0.85
    short = model.rates(own, "short match")
    assert short[0] < 0.1 and short[1] == short[2] == short[3]  # positions never reached: as the one before
    # Proposals always kept at positions 0-2 and never longer: position 3, never tried, is priced as position 2
    # (so a longer proposal gets made and measured), not at the first-position prior.
    for _ in range(20):
        model.record(own, "quote", proposed=3, accepted=3)
    quote = model.rates(own, "quote")
    assert quote[3] > 0.85 and abs(quote[3] - quote[2]) < 0.05
    # Another sequence starts from the engine's counts, then follows its own.
    other = AcceptanceCounts()
    assert model.rates(other, "short match")[0] < 0.1
    for _ in range(30):
        model.record(other, "short match", proposed=2, accepted=2)
    assert model.rates(other, "short match")[0] > 0.7
    assert expected_tokens([1.0] * 4, 5) == 6 and expected_tokens([0.5, 1.0, 1.0, 1.0], 3) == 2.5


def test_plan_lengths_follows_acceptance_and_the_step_cost():
    flat = lambda tokens: 0.010  # noqa: E731  (a step costs the same at any width: bandwidth-bound)
    steep = lambda tokens: 0.010 * tokens  # noqa: E731  (every token costs its full share: compute-bound)
    quoting, novel = Candidate(8, [0.8, 0.95, 0.95, 0.95]), Candidate(8, [0.05, 0.1, 0.1, 0.1])
    assert plan_lengths([quoting], flat, 1, 1) == [8]
    assert plan_lengths([novel], flat, 1, 1) == [8]  # free tokens are worth proposing even if rarely kept
    assert plan_lengths([quoting, novel], steep, 2, 2, required_gain=1.05) == [0, 0]
    # A step that costs 10% more per extra token: long runs for the quoting sequence, none for the other.
    mild = lambda tokens: 0.010 * (1 + 0.1 * (tokens - 1))  # noqa: E731
    assert plan_lengths([quoting, novel], mild, 2, 2) == [8, 0]
    # The first token uncertain, the rest near-certain: propose all or nothing, not one.
    hesitant = Candidate(6, [0.3, 0.98, 0.98, 0.98])
    assert plan_lengths([hesitant], mild, 1, 1) == [6]
    # What proposing costs besides the step (a draft model's passes) counts too.
    assert plan_lengths([quoting], mild, 1, 1, seconds_per_pass=0.010) == [0]
    assert plan_lengths([Candidate(0, [0.9] * 4)], flat, 1, 1) == [0]


def test_one_candidates_plan_is_the_general_plans():
    """plan_lengths takes a shortcut for one candidate (one stream): it must plan exactly what the heap does."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        rates = [rng.random() for _ in range(4)]
        slope, curve = rng.uniform(0, 0.2), rng.uniform(0, 0.05)
        step = lambda tokens: 1.0 + slope * (tokens - 1) + curve * (tokens - 1) ** 2  # noqa: E731
        args = (step, 1, 1, rng.uniform(0, 0.3), rng.choice([0.0, rng.uniform(0, 0.2)]), rng.choice([1.0, 1.05]))
        alone = Candidate(rng.randint(0, 10), rates)
        # A second candidate that may propose nothing sends the plan down the general path.
        assert plan_lengths([alone], *args) == plan_lengths([alone, Candidate(0, rates)], *args)[:1]


def test_a_gain_within_the_noise_is_not_taken():
    flat = lambda tokens: 0.010  # noqa: E731
    assert plan_lengths([Candidate(1, [0.04] * 4)], flat, 1, 1, required_gain=1.05) == [0]  # 4% more tokens
    assert plan_lengths([Candidate(1, [0.06] * 4)], flat, 1, 1, required_gain=1.05) == [1]


def test_a_sequence_that_stops_proposing_still_probes(target):
    """Rejected proposals make the engine stop proposing for a sequence, but one token is tried now and then."""
    from selfhost import LLM, SamplingParams
    from selfhost.speculative.speculator import Speculator

    llm = LLM(target, speculative="ngram", num_speculative_tokens=4, kv_cache_memory="4MiB")
    speculator = llm.engine.speculator
    assert isinstance(speculator, Speculator)
    for n in (1, 2, 3, 4, 5):  # a machine where a wider step costs 15% more per token
        speculator.step_cost.record(n, 0.010 * (1 + 0.15 * (n - 1)))
    seq = llm.engine.add_request("r", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    seq.num_computed_tokens = seq.num_tokens - 1  # as after its prompt: decoding (the speculator runs nothing)
    state = speculator._state(seq)
    for _ in range(40):
        speculator.acceptance.record(state.counts, (True, 4), proposed=4, accepted=0)
    state.evidence = (True, 4)
    lengths = []
    for _ in range(2 * PROBE_EVERY):
        speculator.propose([seq], 64)
        lengths.append(len(seq.proposed))
    assert lengths.count(0) == 2 * PROBE_EVERY - 2 and lengths.count(1) == 2
    seq.proposed = []


def test_a_curve_that_overprices_wider_steps_is_measured_again(target):
    """One early slow sample can make every wider step look too dear: nothing would ever propose, and so
    nothing would measure those widths again. A one-token probe still goes now and then."""
    from selfhost import LLM, SamplingParams
    from selfhost.speculative.speculator import UNPRICED_PROBE_EVERY, Speculator

    llm = LLM(target, speculative="ngram", num_speculative_tokens=4, kv_cache_memory="4MiB")
    speculator = llm.engine.speculator
    assert isinstance(speculator, Speculator)
    speculator.step_cost.record(1, 0.010)
    for n in (2, 3, 4, 5):  # a slow outlier at every wider width: 10x a plain step
        speculator.step_cost.record(n, 0.100)
    seq = llm.engine.add_request("r", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    seq.num_computed_tokens = seq.num_tokens - 1  # as after its prompt: decoding (the speculator runs nothing)
    assert not speculator._could_pay(sequences=1, plain_tokens=1, decoding=1, greedy=True)
    lengths = []
    for _ in range(2 * UNPRICED_PROBE_EVERY):
        speculator.propose([seq], 64)
        lengths.append(len(seq.proposed))
    assert lengths.count(1) == 2 and lengths.count(0) == 2 * UNPRICED_PROBE_EVERY - 2
    seq.proposed = []


@pytest.mark.parametrize("streams", [1, 4])
def test_a_batch_whose_plan_is_empty_sits_out_until_the_next_plan(target, monkeypatch, streams):
    """After a planned step that proposed nothing, the same batch's next steps look up nothing (and time nothing)
    until every QUIET_STEPS'th idle step plans again; a batch of another size plans at once."""
    from selfhost import LLM, SamplingParams
    from selfhost.speculative import ngram
    from selfhost.speculative.speculator import PROBE_EVERY, QUIET_STEPS, Speculator

    llm = LLM(target, speculative="ngram", num_speculative_tokens=4, kv_cache_memory="4MiB")
    speculator = llm.engine.speculator
    assert isinstance(speculator, Speculator)
    cost = speculator.step_cost_for(streams)
    for n in range(streams, streams + 20):  # a wider step costs its full share: no proposal pays, any could
        cost.record(n, 0.010 * n / streams)
    seqs = []
    for i in range(streams):
        seq = llm.engine.add_request(f"r{i}", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=500, temperature=0,
                                                                              ignore_eos=True))
        seq.num_computed_tokens = seq.num_tokens - 1  # decoding
        seqs.append(seq)
    monkeypatch.setattr(speculator, "_could_pay", lambda *args: True)  # lookups are what is counted here
    lookups, original = [], ngram.NgramIndex.lookup
    monkeypatch.setattr(ngram.NgramIndex, "lookup", lambda self, *args: lookups.append(1) or original(self, *args))
    gap = QUIET_STEPS
    assert PROBE_EVERY % gap == 0  # probes fall on planned steps
    steps = PROBE_EVERY - 1  # no probe among them
    empty_steps = speculator.step_cost_for(0)  # record_step([]) times an empty step: 0 tokens, 0 sequences
    per_step, timed = [], []
    for _ in range(steps):
        before = len(lookups)
        speculator.propose(seqs, 64)
        per_step.append(len(lookups) - before)
        assert not any(seq.proposed for seq in seqs)
        speculator.record_step([], 0.001)
        timed.append(empty_steps.measured_counts.get(0) is not None and empty_steps._averages[0].count)
    # Idle step i (1-based) is planned where i is a multiple of the gap; the first step always plans.
    planned = [i == 0 or (i + 1) % gap == 0 for i in range(steps)]
    assert per_step == [streams if p else 0 for p in planned]
    assert [t for t, _ in zip(timed, planned)] == [sum(planned[:i + 1]) for i in range(steps)]  # sat-out steps untimed
    # A batch of another size plans at once.
    other = llm.engine.add_request("other", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=500, temperature=0,
                                                                           ignore_eos=True))
    other.num_computed_tokens = other.num_tokens - 1
    before = len(lookups)
    speculator.propose(seqs + [other], 64)
    assert len(lookups) - before == streams + 1


def test_probes_that_change_nothing_come_ever_less_often(target):
    """Where nothing pays (a draft model's probe also catches the draft up: ~1.3 ms), each unpriced probe that
    leaves the verdict as it was doubles the wait for the next, up to UNPRICED_PROBE_MAX steps."""
    from selfhost import LLM, SamplingParams
    from selfhost.speculative.speculator import UNPRICED_PROBE_EVERY, UNPRICED_PROBE_MAX, Speculator

    llm = LLM(target, speculative="ngram", num_speculative_tokens=4, kv_cache_memory="4MiB")
    speculator = llm.engine.speculator
    assert isinstance(speculator, Speculator)
    speculator.step_cost.record(1, 0.010)
    for n in (2, 3, 4, 5):  # every wider width 10x a plain step, and it stays so: the probes change nothing
        speculator.step_cost.record(n, 0.100)
    seq = llm.engine.add_request("r", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True))
    seq.num_computed_tokens = seq.num_tokens - 1
    probes = []
    for step in range(1, 4 * UNPRICED_PROBE_MAX + 1):
        speculator.propose([seq], 64)
        if seq.proposed:
            probes.append(step)
    gaps = [b - a for a, b in zip([0] + probes, probes)]
    assert gaps[:2] == [UNPRICED_PROBE_EVERY] * 2  # as before: two probes in the first 128 steps
    assert gaps == sorted(gaps) and max(gaps) == UNPRICED_PROBE_MAX and len(probes) < 10
    seq.proposed = []


def test_the_incremental_ngram_index_agrees_with_the_plain_scan():
    """Grow random low-entropy sequences a token or a few at a time; every proposal equals the definition's."""
    import random

    from selfhost.speculative.ngram import NgramIndex

    def matched(proposer: NgramProposer, tokens: list[int], k: int) -> int:
        """The length of the suffix whose continuation the plain scan proposes (0: none)."""
        if k < 1:
            return 0
        for n in range(min(proposer.max_ngram, len(tokens) - 1), proposer.min_ngram - 1, -1):
            if any(tokens[start:start + n] == tokens[-n:] for start in range(len(tokens) - n)):
                return n
        return 0

    rng = random.Random(0)
    for trial in range(300):
        low = rng.randint(1, 3)
        proposer = NgramProposer(min_ngram=low, max_ngram=rng.randint(low, 5))
        index = NgramIndex(proposer)
        vocab = rng.choice([2, 4, 8])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
        for _ in range(40):
            k = rng.randint(0, 5)
            expected = (proposer.propose(tokens, k), matched(proposer, tokens, k))
            assert index.lookup(tokens, k) == expected, (tokens, k)
            if rng.random() < 0.2:  # asked again before the sequence grew (a step that did not run it)
                assert index.lookup(tokens, k) == expected
            tokens.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 3)))


def test_step_cost_interpolates():
    from selfhost.speculative.step_cost import StepCostModel

    cost = StepCostModel()
    assert cost.seconds(4) is None
    for n, seconds in [(1, 0.010), (8, 0.011), (64, 0.050), (256, 0.200)]:
        cost.record(n, seconds)
    assert cost.seconds(1) == 0.010 and cost.seconds(4) == pytest.approx(0.010 + 0.001 * 3 / 7)
    # Past the largest measured step: the slope of its upper half (64 -> 256 tokens: 0.15 ms a token more).
    assert cost.seconds(1000) == pytest.approx(0.200 + (1000 - 256) * 0.150 / 192)
    one = StepCostModel()
    one.record(1, 0.010)
    assert one.seconds(9) == 0.010  # one count measured: flat, so that a wider step is tried once
    # 64 decoding sequences proposing 3 tokens each: the step is 4x the tokens at ~4x the time.
    assert plan_lengths([Candidate(3, [0.5] * 4)] * 64, cost.seconds, 64, 64, required_gain=1.05) == [0] * 64
    assert plan_lengths([Candidate(3, [0.5] * 4)], cost.seconds, 1, 1, required_gain=1.05) == [3]
    for _ in range(3):
        cost.record(1, 0.010)
    cost.record(1, 0.015)  # a running average, not the last value
    assert 0.010 < cost.seconds(1) < 0.015


def test_a_slow_step_cannot_make_a_width_look_dear_for_long():
    """A neighbour's burst on a shared machine: a 13 ms step among 1 ms ones (seen on the 2-core VM)."""
    from selfhost.speculative.step_cost import OUTLIER, RobustAverage, StepCostModel

    cost = StepCostModel()
    for n, seconds in [(1, 0.0006), (4, 0.0008), (8, 0.013)]:  # the first 8-token step was the slow one
        cost.record(n, seconds)
    assert cost.seconds(8) <= OUTLIER * 0.0008 * 8 / 4  # bounded by the 4-token step, scaled by tokens
    cost.record(8, 0.0010)
    assert cost.seconds(8) == 0.0010  # the first few observations: their minimum
    average = RobustAverage()
    for seconds in (0.001, 0.001, 0.001, 0.050):  # settled, then one slow observation
        average.record(seconds)
    assert average.value <= 0.001 * (1 + 0.2 * (OUTLIER - 1)) + 1e-12


def test_a_batchs_step_times_do_not_price_one_streams_proposals(target):
    """Steps are timed per number of sequences: 8 tokens for 4 sequences cost about twice 8 for one (a context
    and a sampled row each), and one curve for both had made one stream's proposals look dear after a batch."""
    from types import SimpleNamespace

    from selfhost import LLM, SamplingParams
    from selfhost.speculative.speculator import Speculator

    llm = LLM(target, speculative="ngram", num_speculative_tokens=4, kv_cache_memory="4MiB")
    speculator = llm.engine.speculator
    assert isinstance(speculator, Speculator)
    decode = lambda tokens: SimpleNamespace(num_tokens=tokens, num_own_tokens=1)  # noqa: E731
    for n in (1, 2, 3, 4, 5):  # one stream: a wider step costs little
        speculator.record_step([decode(n)], 0.010 * (1 + 0.02 * (n - 1)))
    speculator.record_step([decode(1)] * 4, 0.012)
    for n in (5, 6, 7, 8):  # four streams with proposals: dear
        speculator.record_step([decode(n - 3)] + [decode(1)] * 3, 0.060)
    assert speculator.step_cost.seconds(5) < 0.011 and speculator.step_cost_for(4).seconds(5) > 0.025
    seq = llm.engine.add_request("r", [5, 6, 7, 8] * 10, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    seq.num_computed_tokens = seq.num_tokens - 1
    state = speculator._state(seq)
    for _ in range(20):
        speculator.acceptance.record(state.counts, (True, 4), proposed=4, accepted=4)
    speculator.propose([seq], 64)
    assert seq.proposed == [5, 6, 7, 8]
    seq.proposed = []
