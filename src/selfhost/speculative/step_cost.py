"""When speculating pays: a step-time curve measured on this machine, and the decision it drives.

A verifying step feeds k proposed tokens more per sequence. While a step is bound by reading
the weights (one stream, a few streams, a small model dominated by per-layer overhead), the
extra tokens cost almost nothing and every accepted one is a token gained. Once the batch is
large enough that arithmetic is the bound, they cost their full share and rejected ones are
pure loss. Where that switch lies depends on the CPU, the model and the thread count, so it
is not a constant: the engine times its own steps by their token count and speculates only
while the expected tokens per second with the proposals beat those without.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class StepCostModel:
    """Seconds per step as a function of the step's token count, from the steps the engine ran.

    One running average per observed count; counts never seen are interpolated between their
    neighbours, and extrapolated flat (optimistic: the first step of a new size measures it)."""

    smoothing: float = 0.2  # weight of the latest step in a count's running average
    _counts: list[int] = field(default_factory=list)  # sorted token counts observed
    _seconds: dict[int, float] = field(default_factory=dict)

    def record(self, num_tokens: int, seconds: float) -> None:
        old = self._seconds.get(num_tokens)
        if old is None:
            bisect.insort(self._counts, num_tokens)
            self._seconds[num_tokens] = seconds
        else:
            self._seconds[num_tokens] = (1 - self.smoothing) * old + self.smoothing * seconds

    @property
    def measured_counts(self) -> dict[int, float]:
        return self._seconds

    def seconds(self, num_tokens: int) -> float | None:
        """Estimated step time for `num_tokens`; None before any step was measured."""
        if not self._counts:
            return None
        known = self._seconds.get(num_tokens)
        if known is not None:
            return known
        i = bisect.bisect_left(self._counts, num_tokens)
        if i == 0:
            return self._seconds[self._counts[0]]
        if i == len(self._counts):
            return self._seconds[self._counts[-1]]
        lo, hi = self._counts[i - 1], self._counts[i]
        weight = (num_tokens - lo) / (hi - lo)
        return (1 - weight) * self._seconds[lo] + weight * self._seconds[hi]


def expected_tokens(acceptance: float, proposed: int) -> float:
    """Tokens a verification appends on average: the accepted share of the proposal plus the target's own."""
    return 1.0 + acceptance * proposed


# Proposals must promise this much more than plain decoding: the estimates are noisy, and a step
# that only breaks even on paper can lose in practice (the bound: never 5% slower).
REQUIRED_GAIN = 1.05


def speculation_pays(cost: StepCostModel, num_plain_tokens: int, extra_tokens: int, plain_yield: int,
                     speculative_yield: float, proposal_seconds: float = 0.0) -> bool:
    """Whether a step with `extra_tokens` proposed tokens more is expected to produce more tokens per second.

    num_plain_tokens: the step's tokens without proposals; plain_yield: the tokens it appends
    (one per decoding sequence); speculative_yield: expected tokens appended with the proposals;
    proposal_seconds: what speculating costs besides the wider forward pass (making the proposals:
    lookups or a draft model's passes; accepting them)."""
    plain = cost.seconds(num_plain_tokens)
    wider = cost.seconds(num_plain_tokens + extra_tokens)
    if plain is None or wider is None:
        return True  # nothing measured yet: try, and the step is measured
    return speculative_yield / (wider + proposal_seconds) > REQUIRED_GAIN * plain_yield / plain
