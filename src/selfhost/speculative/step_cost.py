"""When speculating pays: a step-time curve measured on this machine (the decision is adaptive.py's).

A verifying step feeds k proposed tokens more per sequence. While a step is bound by reading
the weights (one stream, a few streams, a small model dominated by per-layer overhead), the
extra tokens cost almost nothing and every accepted one is a token gained. Once the batch is
large enough that arithmetic is the bound, they cost their full share and rejected ones are
pure loss. Where that switch lies depends on the CPU, the model and the thread count, so it
is not a constant: the engine times its own steps by their token count and speculates only
while the expected tokens per second with the proposals beat those without (plan_lengths).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


OUTLIER = 2.0


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
        if old is not None:
            # A step slowed by something else on the machine counts as at most OUTLIER x the estimate: one
            # slow step must not make a width look dear for long (it is measured again only if it is chosen).
            seconds = min(seconds, OUTLIER * old)
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


# Proposals must promise this much more than plain decoding: the estimates are noisy, and a step
# that only breaks even on paper can lose in practice (the bound: never 5% slower).
REQUIRED_GAIN = 1.05
