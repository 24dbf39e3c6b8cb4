"""The engine's speculative decoding: proposals before a step, verification after it.

Before each step the speculator picks the decoding sequences that may speculate (plain
sampling: no penalties, output constraint or logits processors, whose per-token state a
multi-token verification would have to replay), asks each one's proposer for up to its
adaptive length, and keeps the whole step's proposals only while the measured step-time curve
says they pay (step_cost.py). The scheduler then feeds each proposal behind its sequence's
last token; the step's logits for those rows come back here, where greedy acceptance or
rejection sampling (verify.py) decides the tokens to append.
"""

from __future__ import annotations

import time

import torch

from selfhost.engine.scheduler import ScheduledChunk
from selfhost.engine.sequence import Sequence
from selfhost.layers.sampler import Logprobs, filter_logits, score_tokens
from selfhost.speculative.adaptive import PROBE_EVERY, AcceptanceModel, Candidate, plan_lengths
from selfhost.speculative.config import SpeculativeConfig
from selfhost.speculative.draft import DraftProposer
from selfhost.speculative.ngram import NgramIndex, NgramProposer
from selfhost.speculative.state import SequenceSpeculation, SpeculationStats
from selfhost.speculative.step_cost import REQUIRED_GAIN, RobustAverage, StepCostModel
from selfhost.speculative.verify import accept_argmax, accept_greedy, accept_sampled

# Without a measured plain step of the current size, one in this many steps runs without
# proposals, so the comparison always has both sides.
PLAIN_PROBE_EVERY = 16
# After a step whose plan proposed nothing, the speculator sits out the same batch's following steps (no
# lookup, no plan, no step timing) and plans again only on every QUIET_STEPS'th idle step: one stream's lookup,
# plan and timing had cost ~18 us of a ~0.3-0.4 ms step on text with nothing to copy (demo model, 2-core Xeon:
# 0.91-0.94x of plain decoding), four streams' lookups ~12% of a step. A quote that starts is then proposed up to
# QUIET_STEPS - 1 tokens late (every 4th step measured no better on the copy workload, and ~3 us a step
# dearer on novel text). A draft model's proposals rest on nothing that changes from one idle step to the next
# (a lookup's do: a match that starts), so a draft engine sits out until the next probe (PROBE_EVERY). Both
# divide PROBE_EVERY, so probes fall on planned steps.
QUIET_STEPS = 8
# A probe (see Speculator._lengths) is taken only if it makes its step at most this much dearer.
PROBE_COST = 0.25
# ... and after this many steps that propose nothing whatever the curve says it costs: one early slow
# sample can overprice wider steps for good (no proposal, and no probe, would ever measure them again).
# Each such probe that changes nothing doubles the wait, up to UNPRICED_PROBE_MAX: a draft model's probe
# also catches the draft up on every token since its last pass (~1.3 ms for the demo model after 64
# steps), which every 64 steps had cost the draft arm ~6% where it never pays.
UNPRICED_PROBE_EVERY = 4 * PROBE_EVERY
UNPRICED_PROBE_MAX = 512
# Whether any proposal could pay for a step of a given shape (Speculator._could_pay) is worked out again
# only this often: the curve and the overheads it reads move slowly, and at one stream the answer is ~6 us
# of a ~0.4 ms step.
COULD_PAY_EVERY = 8


def _all_greedy(candidates: list[tuple[Sequence, SequenceSpeculation, int]]) -> bool:
    return all(state.greedy for _, state, _ in candidates)


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: DraftProposer | None = None):
        self.config = config
        self.draft = draft
        self.ngram = NgramProposer(config.ngram_min, config.ngram_max) if config.method == "ngram" else None
        # The model's forward and sampling by the step's token count, one curve per number of sequences in the
        # step: 8 tokens for 4 sequences cost ~2x 8 tokens for one (a context and a sampled row each), and one
        # curve for both had made a single stream's proposals look dear after a batch (copy 1.7x -> 1.3-1.5x).
        self.step_costs: dict[int, StepCostModel] = {}
        self.acceptance = AcceptanceModel()  # how often proposals are kept, by what they rest on
        # What speculation costs besides the wider forward, as running averages: per speculating
        # sequence (proposing by lookup, verifying), and per draft-model pass (batched over sequences).
        # By kind of request (greedy: True): a sampled verification filters, normalises and draws, ~0.2 ms
        # more, and a sampled workload must not make greedy proposals look dear afterwards.
        self._seconds_per_sequence = {True: RobustAverage(), False: RobustAverage()}
        self._step_greedy = True  # whether this step's speculating sequences were all greedy
        self._draft_seconds_per_pass = RobustAverage()
        self._step_overhead = 0.0  # this step's so far
        self._step_sequences = 0
        self._streak = 0  # steps in a row with proposals
        self._idle_steps = 0  # steps in a row where sequences could have proposed and none did
        self._unpriced_gap = UNPRICED_PROBE_EVERY  # idle steps from one unpriced probe to the next
        self._next_unpriced = UNPRICED_PROBE_EVERY  # ... the idle step that takes the next one
        self._quiet_batch: int | None = None  # the batch size whose last planned step proposed nothing
        self._sits_out = config.when == "measured"  # "always" looks up every step
        self._quiet_steps = QUIET_STEPS if config.method == "ngram" else PROBE_EVERY  # idle steps a plan holds
        self._quiet_step = False  # whether this step sat out (see QUIET_STEPS)
        self._proposing_steps = 0
        self._propose_calls = 0  # steps so far (the engine proposes once a step)
        self._could_pay_cache: dict[tuple[int, int, int, bool], tuple[bool, int]] = {}  # step shape -> (answer, until)
        self._proposed = self._accepted = self._verifications = self._steps = 0

    def step_cost_for(self, sequences: int) -> StepCostModel:
        """The step-time curve of steps that run `sequences` sequences."""
        cost = self.step_costs.get(sequences)
        if cost is None:
            cost = self.step_costs[sequences] = StepCostModel()
        return cost

    @property
    def step_cost(self) -> StepCostModel:
        """One stream's curve."""
        return self.step_cost_for(1)

    def can_speculate(self, seq: Sequence) -> bool:
        """Decoding (its prompt done) with sampling whose verification needs no per-token replay.

        A seeded sampled request speculates only under when="always": its draws depend on which steps
        verified proposals, and under "measured" that follows this machine's step times, so it decodes
        plainly and stays reproducible (and equal to its output without speculation)."""
        return self._state(seq).eligible and seq.num_uncomputed == 1 and not seq.is_finished

    def _state(self, seq: Sequence) -> SequenceSpeculation:
        if seq.speculation is None:
            # What a request asked for does not change while it runs: its eligibility is settled once.
            row = seq.sampler_row
            reproducible = row.is_greedy or row.seed is None or self.config.when == "always"
            eligible = (seq.grammar is None and not row.has_penalties and not row.logits_processors
                        and reproducible)
            seq.speculation = SequenceSpeculation(NgramIndex(self.ngram) if self.ngram is not None else None,
                                                  eligible, row.is_greedy)
        return seq.speculation

    def propose(self, running: list[Sequence], token_budget: int) -> None:
        """Set `seq.proposed` for the running sequences worth speculating on this step (others: [])."""
        batch = len(running)
        if batch == self._quiet_batch and (self._idle_steps + 1) % self._quiet_steps:
            # The last planned step proposed nothing, so no sequence holds a proposal: sit this one out.
            self._propose_calls += 1
            self._idle_steps += 1
            self._quiet_step = True
            return
        self._quiet_step = False
        self._quiet_batch = None
        started = time.perf_counter()
        draft_seconds = self._propose(running, token_budget)
        if self._step_sequences:
            self._step_overhead += time.perf_counter() - started - draft_seconds
        if not self._sits_out:
            self._quiet_batch = None

    def _propose(self, running: list[Sequence], token_budget: int) -> float:
        """propose(); returns the seconds the draft model's passes took."""
        self._propose_calls += 1
        # One pass over the batch for the step's shape and the sequences that may speculate.
        plain_tokens = decoding = 0
        greedy = True
        eligible = []
        for seq in running:
            if seq.proposed:
                seq.proposed = []
            uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            plain_tokens += uncomputed
            if uncomputed != 1:
                continue
            decoding += 1
            state = seq.speculation or self._state(seq)
            greedy = greedy and state.greedy
            if state.eligible and not seq.is_finished:
                eligible.append((seq, state))
        if not eligible:
            self._streak = 0
            return 0.0
        plain_tokens = min(plain_tokens, token_budget)
        unpriced_probe = False
        if not self._could_pay(len(running), plain_tokens, decoding, greedy):
            self._streak = 0
            self._idle_steps += 1
            if not self._unpriced_probe_due():
                self._quiet_batch = len(running)
                return 0.0
            unpriced_probe = True  # the curve may be what says no: measure a wider step now and then
        candidates = []
        num_tokens = self.config.num_tokens
        for seq, state in eligible:
            # Never propose past max_tokens: the verification appends up to k + 1 tokens.
            k = min(num_tokens, seq.max_output - len(seq.output_ids) - 1)
            if k < 1:
                continue
            if state.ngram is not None:
                tokens, matched = state.ngram.lookup(seq.token_ids, k)
                if not tokens:
                    continue
                state.evidence = (state.greedy, matched)
                state.lookup = tokens
                k = len(tokens)
            else:
                state.evidence = (state.greedy,)
            candidates.append((seq, state, k))
        if not candidates:  # nothing to propose: an idle step
            self._streak = 0
            if not unpriced_probe:  # (which counted it already)
                self._idle_steps += 1
            self._quiet_batch = len(running)
            return 0.0
        lengths = (self._probe(candidates) if unpriced_probe
                   else self._lengths(self.step_cost_for(len(running)), plain_tokens, decoding, candidates))
        if not any(lengths):
            self._streak = 0
            if self._idle_steps:  # the plan proposed nothing (not a plain step taken to measure one)
                self._quiet_batch = len(running)
            return 0.0
        self._streak += 1
        chosen = [(seq, state, k) for (seq, state, _), k in zip(candidates, lengths) if k > 0]
        for _, state, _ in chosen:
            state.last_proposed = self._proposing_steps
        self._proposing_steps += 1
        self._step_sequences = len(chosen)
        self._step_greedy = all(state.greedy for _, state, _ in chosen)
        if self.draft is None:
            for seq, state, k in chosen:
                seq.proposed = state.lookup[:k]
            self._steps += 1
            return 0.0
        start = time.perf_counter()
        proposals = self.draft.propose([seq for seq, _, _ in chosen], [k for _, _, k in chosen])
        draft_seconds = time.perf_counter() - start
        if not self.draft.caught_up_prompt:  # a one-off catch-up on a prompt (~2 ms, demo model) is no pass's cost
            self._draft_seconds_per_pass.record(draft_seconds / max(lengths))
        for (seq, state, _), proposal in zip(chosen, proposals):
            seq.proposed = proposal.tokens
            state.draft_probs = proposal.draft_probs
        self._steps += any(proposal.tokens for proposal in proposals)  # the draft may hold none of them
        return draft_seconds

    def _overhead_per_sequence(self, greedy: bool) -> float:
        """Measured seconds of proposing and verifying per speculating sequence: greedy ones', or the
        dearer kind's where sampled requests are among them."""
        kinds = (True,) if greedy else (True, False)
        return max(self._seconds_per_sequence[kind].value or 0.0 for kind in kinds)

    def _could_pay(self, sequences: int, plain_tokens: int, decoding: int, greedy: bool) -> bool:
        """Whether proposals could pay this step even if every decoding sequence proposed k tokens and all
        were kept (for some k). Where a wider step costs its full share of tokens (a large batch), none
        can, and the step skips the lookups and the plan: ~10 us a sequence, 6-9% of a 16-stream step.
        The answer for the same step shape is reused for COULD_PAY_EVERY steps (the curve moves slowly)."""
        if self.config.when == "always":
            return True
        key = (sequences, plain_tokens, decoding, greedy)
        cached = self._could_pay_cache.get(key)
        if cached is not None and cached[1] > self._propose_calls:
            return cached[0]
        cost = self.step_cost_for(sequences)
        plain = cost.seconds(plain_tokens)
        if plain is None or decoding == 0:
            return plain is None  # nothing measured yet: not cached, the first steps measure
        overhead = decoding * self._overhead_per_sequence(greedy)
        per_pass = self._draft_seconds_per_pass.value or 0.0
        seconds = cost.seconds
        answer = any(decoding * (1 + k) / (seconds(plain_tokens + decoding * k) + overhead + k * per_pass)
                     > REQUIRED_GAIN * decoding / plain for k in range(1, self.config.num_tokens + 1))
        if len(self._could_pay_cache) > 256:
            self._could_pay_cache.clear()
        self._could_pay_cache[key] = (answer, self._propose_calls + COULD_PAY_EVERY)
        return answer

    def _lengths(self, cost: StepCostModel, plain_tokens: int, decoding: int,
                 candidates: list[tuple[Sequence, SequenceSpeculation, int]]) -> list[int]:
        """How many tokens each candidate proposes this step (see adaptive.py); all zeros: a plain step."""
        if self.config.when == "always":
            return [k for _, _, k in candidates]
        if plain_tokens not in cost.measured_counts and self._streak >= PLAIN_PROBE_EVERY:
            return [0] * len(candidates)  # measure a plain step of this size
        elif cost.seconds(plain_tokens) is None:
            return [k for _, _, k in candidates]  # nothing measured yet: try, and the step is measured
        else:
            lengths = plan_lengths(
                [Candidate(k, self.acceptance.rates(state.counts, state.evidence)) for _, state, k in candidates],
                cost.seconds, plain_tokens, decoding, self._overhead_per_sequence(_all_greedy(candidates)),
                self._draft_seconds_per_pass.value or 0.0, REQUIRED_GAIN)
        # A step where nobody proposes still probes now and then: one token for the sequence that has gone
        # longest without proposing (its counts, and the engine's, would otherwise never change), where one
        # more token makes the step little dearer. One probe per PROBE_EVERY such steps, whatever the batch.
        if any(lengths):
            self._idle_steps = 0
            self._unpriced_gap = self._next_unpriced = UNPRICED_PROBE_EVERY
            return lengths
        self._idle_steps += 1
        if self._idle_steps % PROBE_EVERY:
            return lengths
        plain = cost.seconds(plain_tokens)
        extra = (cost.seconds(plain_tokens + 1) - plain + self._overhead_per_sequence(_all_greedy(candidates))
                 + (self._draft_seconds_per_pass.value or 0.0))  # a draft model's pass is no small probe
        if extra <= PROBE_COST * plain or self._unpriced_probe_due():
            return self._probe(candidates)
        return lengths

    def _unpriced_probe_due(self) -> bool:
        """Whether this idle step takes a probe whatever it costs (see UNPRICED_PROBE_EVERY); if so, the next
        one waits twice as long."""
        if self._idle_steps < self._next_unpriced:
            return False
        self._next_unpriced = self._idle_steps + self._unpriced_gap
        self._unpriced_gap = min(2 * self._unpriced_gap, UNPRICED_PROBE_MAX)
        return True

    @staticmethod
    def _probe(candidates: list[tuple[Sequence, SequenceSpeculation, int]]) -> list[int]:
        """One token for the candidate that has gone longest without proposing, none for the others."""
        lengths = [0] * len(candidates)
        lengths[min(range(len(candidates)), key=lambda i: candidates[i][1].last_proposed)] = 1
        return lengths

    def verify(self, seq: Sequence, proposed: tuple[int, ...], logits: torch.Tensor, argmax: list[int] | None = None
               ) -> tuple[list[int], list[Logprobs | None]]:
        """The tokens to append after a verifying step, and their logprobs where the request asked.

        logits: (1 + len(proposed), vocab), row i predicting the token after proposal i - 1; argmax: those
        rows' argmax where the step found them already (a plain greedy step on CPU)."""
        started = time.perf_counter()
        try:
            return self._verify(seq, proposed, logits, argmax)
        finally:
            self._step_overhead += time.perf_counter() - started

    def _verify(self, seq: Sequence, proposed: tuple[int, ...], logits: torch.Tensor, argmax: list[int] | None
                ) -> tuple[list[int], list[Logprobs | None]]:
        state = seq.speculation
        row = seq.sampler_row
        if argmax is not None:
            tokens = accept_argmax(argmax, proposed)
        elif state.greedy:
            tokens = accept_greedy(logits, proposed)
        else:
            probs = filter_logits(logits.float(), [row] * logits.shape[0]).softmax(dim=-1)
            tokens = accept_sampled(probs, list(proposed), state.draft_probs, row.generator(probs.device))
        state.draft_probs = None
        accepted = len(tokens) - 1
        self.acceptance.record(state.counts, state.evidence, len(proposed), accepted)
        self._proposed += len(proposed)
        self._accepted += accepted
        self._verifications += 1
        if row.num_logprobs is None:
            return tokens, [None] * len(tokens)
        return tokens, score_tokens(logits[:len(tokens)], tokens, [row.num_logprobs] * len(tokens))

    def record_step(self, chunks: list[ScheduledChunk], seconds: float) -> None:
        """The step's forward and sampling took `seconds`; also closes the step's account of what
        proposing and verifying cost.

        Only steps of decodes and verifications are timed: a prompt chunk of n tokens runs another
        path (the prompt kernels, the layers one by one) at another cost than n decode or
        verification rows, and counted as one it would make proposals look dear. A step that sat out is
        not timed either: the planned steps among the quiet ones keep the plain step's time current."""
        if self._quiet_step:
            return
        num_tokens = 0
        for chunk in chunks:
            if chunk.num_own_tokens != 1:
                break
            num_tokens += chunk.num_tokens
        else:
            self.step_cost_for(len(chunks)).record(num_tokens, seconds)
        if self._step_sequences:
            per_sequence = self._step_overhead / self._step_sequences
            self._seconds_per_sequence[self._step_greedy].record(per_sequence)
        self._step_overhead, self._step_sequences = 0.0, 0

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: free what its speculation holds."""
        if self.draft is not None:
            self.draft.release(seq)
        seq.speculation = None
        seq.proposed = []

    def stats(self) -> SpeculationStats:
        return SpeculationStats(self._proposed, self._accepted, self._verifications, self._steps)
