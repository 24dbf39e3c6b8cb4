"""How many tokens to propose: how often proposals like these were kept, against what a wider step costs.

The first proposed token is the uncertain one; once a proposal starts to agree with the target it
usually goes on agreeing (a quote continues), so acceptance is counted per position in the
proposal (0, 1, 2, 3 and beyond), given the tokens before it were kept, and per kind of evidence
behind the proposal (prompt lookup: how long the matched suffix was; greedy or sampled request).
Each sequence keeps its own counts, read against the engine's counts for the same evidence as
a prior, so a sequence whose proposals keep failing backs off (to none: a plain step) while one
that quotes proposes long runs.

`plan_lengths` then picks every speculating sequence's length for the step at once: token by
token, the proposed token most likely to be kept goes in next, and the step keeps the lengths
with the most expected tokens per second by the measured step-time curve (step_cost.py). One
stream on a small model, where a wider step costs little, proposes long; a large batch, where
every extra token costs its full share, proposes nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

POSITIONS = 4  # acceptance counted apart for positions 0, 1, 2 and 3+ of a proposal
PRIOR_RATE = 0.5  # what the engine assumes of evidence it has not seen kept or rejected
PRIOR_WEIGHT = 2.0  # ... worth this many observations
SEQUENCE_PRIOR_WEIGHT = 4.0  # the engine's rate weighs this many of a sequence's own observations
RECENT_TRIES = 256  # the engine's counts per (evidence, position) are halved past this: recent ones weigh more
PROBE_EVERY = 16  # a sequence proposing nothing still proposes one token this often, to notice a change


@dataclass
class AcceptanceCounts:
    """Tries and keeps by evidence, then position (a list of POSITIONS): a proposed token is "tried" when the
    ones before it were kept."""

    kept: dict[Hashable, list[float]] = field(default_factory=dict)
    tried: dict[Hashable, list[float]] = field(default_factory=dict)

    def record(self, evidence: Hashable, proposed: int, accepted: int, cap: float | None = None) -> None:
        reached = min(accepted + 1, proposed)  # positions tried
        if reached <= 0:
            return
        tried = self.tried.get(evidence)
        if tried is None:
            tried = self.tried[evidence] = [0.0] * POSITIONS
            self.kept[evidence] = [0.0] * POSITIONS
        kept = self.kept[evidence]
        last = POSITIONS - 1
        for position in range(min(reached, last)):
            tried[position] += 1.0
            kept[position] += position < accepted
        if reached > last:  # positions last.. share one count
            tried[last] += reached - last
            kept[last] += max(0, min(accepted, reached) - last)
        if cap is not None:
            for position in range(min(reached, POSITIONS)):
                if tried[position] > cap:
                    tried[position] /= 2
                    kept[position] /= 2

    def rate(self, evidence: Hashable, position: int, prior: float, weight: float) -> float:
        tried = self.tried.get(evidence)
        if tried is None:
            return prior
        return (self.kept[evidence][position] + weight * prior) / (tried[position] + weight)


_NONE_SEEN = [0.0] * POSITIONS


@dataclass
class AcceptanceModel:
    """The engine's counts (one per proposer); sequences read them as the prior for their own."""

    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)

    def rates(self, own: AcceptanceCounts, evidence: Hashable) -> list[float]:
        """Probability that a proposal's token at each position is kept, given the earlier ones were.

        The engine's estimate for a position starts from its estimate for the position before (a quote
        that was kept so far goes on), the first position's from PRIOR_RATE: with PRIOR_RATE at every
        position, proposals kept 95% of the time at positions 0-2 had priced position 3 at 0.5, so they
        were never made longer and position 3 was never measured (demo model, copy workload)."""
        engine_kept = self.counts.kept.get(evidence, _NONE_SEEN)
        engine_tried = self.counts.tried.get(evidence, _NONE_SEEN)
        own_kept, own_tried = own.kept.get(evidence, _NONE_SEEN), own.tried.get(evidence, _NONE_SEEN)
        rates, engine = [], PRIOR_RATE
        for i in range(POSITIONS):
            engine = (engine_kept[i] + PRIOR_WEIGHT * engine) / (engine_tried[i] + PRIOR_WEIGHT)
            rates.append((own_kept[i] + SEQUENCE_PRIOR_WEIGHT * engine) / (own_tried[i] + SEQUENCE_PRIOR_WEIGHT))
        return rates

    def record(self, own: AcceptanceCounts, evidence: Hashable, proposed: int, accepted: int) -> None:
        own.record(evidence, proposed, accepted)
        self.counts.record(evidence, proposed, accepted, cap=RECENT_TRIES)


def expected_tokens(rates: list[float], proposed: int) -> float:
    """Tokens a verification appends on average: each proposal kept while all before it were, plus the target's own."""
    total, reach = 1.0, 1.0
    for i in range(proposed):
        reach *= rates[min(i, POSITIONS - 1)]
        total += reach
    return total


class Candidate(NamedTuple):
    """A sequence that may speculate this step: at most `max_tokens`, kept at `rates` by position."""

    max_tokens: int
    rates: list[float]


def plan_lengths(candidates: list[Candidate], step_seconds: Callable[[int], float], plain_tokens: int,
                 plain_yield: int, seconds_per_sequence: float = 0.0, seconds_per_pass: float = 0.0,
                 required_gain: float = 1.0) -> list[int]:
    """Proposal lengths for `candidates` with the most expected tokens per second, or all zeros where
    none beats plain decoding by `required_gain`.

    step_seconds(n): a step of n tokens; plain_tokens / plain_yield: the step's tokens without proposals
    and the tokens it appends; seconds_per_sequence: what proposing and verifying cost per speculating
    sequence besides the wider step; seconds_per_pass: a draft model's pass (one per proposed position)."""
    plain = plain_yield / step_seconds(plain_tokens)
    if len(candidates) == 1:
        return [_plan_one(candidates[0], step_seconds, plain_tokens, plain_yield, seconds_per_sequence,
                          seconds_per_pass, plain * required_gain)]
    lengths = [0] * len(candidates)
    best_value, best = plain * required_gain, list(lengths)
    # The next token of each sequence, most likely kept first (a max-heap on the chance it is kept).
    heap = [(-c.rates[0], i) for i, c in enumerate(candidates) if c.max_tokens > 0]
    heapq.heapify(heap)
    tokens, gained, sequences, passes = plain_tokens, 0.0, 0, 0
    while heap:
        neg_gain, i = heapq.heappop(heap)
        gain = -neg_gain
        lengths[i] += 1
        tokens += 1
        gained += gain
        sequences += lengths[i] == 1
        passes = max(passes, lengths[i])
        value = (plain_yield + gained) / (step_seconds(tokens) + sequences * seconds_per_sequence
                                          + passes * seconds_per_pass)
        if value > best_value:
            best_value, best = value, list(lengths)
        elif value < 0.8 * best_value:
            break  # far past the best: further tokens are less likely kept and cost no less
        c = candidates[i]
        if lengths[i] < c.max_tokens:
            heapq.heappush(heap, (-gain * c.rates[min(lengths[i], POSITIONS - 1)], i))
    return best


def _plan_one(candidate: Candidate, step_seconds: Callable[[int], float], plain_tokens: int, plain_yield: int,
              seconds_per_sequence: float, seconds_per_pass: float, to_beat: float) -> int:
    """plan_lengths for one candidate (one stream, the common case): its tokens go in in order, so no heap."""
    rates, best_value, best = candidate.rates, to_beat, 0
    gained, reach = 0.0, 1.0
    for length in range(1, candidate.max_tokens + 1):
        reach *= rates[length - 1 if length < POSITIONS else POSITIONS - 1]
        gained += reach
        value = (plain_yield + gained) / (step_seconds(plain_tokens + length) + seconds_per_sequence
                                          + length * seconds_per_pass)
        if value > best_value:
            best_value, best = value, length
        elif value < 0.8 * best_value:
            break  # as in plan_lengths
    return best
