"""When speculating pays: a step-time curve measured on this machine (the decision is adaptive.py's).

A verifying step feeds k proposed tokens more per sequence. While a step is bound by reading
the weights (one stream, a few streams, a small model dominated by per-layer overhead), the
extra tokens cost almost nothing and every accepted one is a token gained. Once the batch is
large enough that arithmetic is the bound, they cost their full share and rejected ones are
pure loss. Where that switch lies depends on the CPU, the model and the thread count, so it
is not a constant: the engine times its own steps by their token count (one StepCostModel per
number of sequences in the step: speculator.py) and speculates only while the expected tokens per
second with the proposals beat those without (plan_lengths).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


# Timings on a shared machine are only ever too slow (a neighbour's burst, a collection pause), and a
# width or overhead that once looked dear is not tried again to correct it. So an observation counts
# as at most OUTLIER x the current estimate, and the first few of a quantity are combined by minimum.
OUTLIER = 2.0
FIRST_BY_MINIMUM = 3


@dataclass
class RobustAverage:
    """A running average of timings that one slow observation cannot inflate for long (see OUTLIER)."""

    smoothing: float = 0.2  # weight of the latest observation once past the first few
    value: float | None = None
    count: int = 0

    def record(self, seconds: float) -> float:
        self.count += 1
        if self.value is None:
            self.value = seconds
        elif self.count <= FIRST_BY_MINIMUM:
            self.value = min(self.value, seconds)
        else:
            self.value = (1 - self.smoothing) * self.value + self.smoothing * min(seconds, OUTLIER * self.value)
        return self.value


@dataclass
class StepCostModel:
    """Seconds per step as a function of the step's token count, from the steps the engine ran.

    One RobustAverage per observed count; counts never seen are interpolated between their
    neighbours, and extrapolated past the largest along its upper half's slope. A first
    observation counts as at most OUTLIER x the next smaller count's time scaled by the token ratio
    (a wider step costs at most its share of tokens more)."""

    smoothing: float = 0.2
    _counts: list[int] = field(default_factory=list)  # sorted token counts observed
    _averages: dict[int, RobustAverage] = field(default_factory=dict)
    _seconds: dict[int, float] = field(default_factory=dict)  # each average's value

    def record(self, num_tokens: int, seconds: float) -> None:
        average = self._averages.get(num_tokens)
        if average is None:
            i = bisect.bisect_left(self._counts, num_tokens)
            if i > 0:
                smaller = self._counts[i - 1]
                seconds = min(seconds, OUTLIER * self._seconds[smaller] * num_tokens / smaller)
            self._counts.insert(i, num_tokens)
            average = self._averages[num_tokens] = RobustAverage(self.smoothing)
        self._seconds[num_tokens] = average.record(seconds)

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
            return self._extrapolated(num_tokens)
        lo, hi = self._counts[i - 1], self._counts[i]
        weight = (num_tokens - lo) / (hi - lo)
        return (1 - weight) * self._seconds[lo] + weight * self._seconds[hi]

    def _extrapolated(self, num_tokens: int) -> float:
        """Past the largest count: the slope of its upper half (per-token cost grows with the batch), flat
        with one count measured (so a first wider step is tried and measured)."""
        top = self._counts[-1]
        if len(self._counts) == 1:
            return self._seconds[top]
        base = self._counts[min(bisect.bisect_left(self._counts, top / 2), len(self._counts) - 2)]
        slope = max(0.0, (self._seconds[top] - self._seconds[base]) / (top - base))
        return self._seconds[top] + slope * (num_tokens - top)


# Proposals must promise this much more than plain decoding: the estimates are noisy, and a step
# that only breaks even on paper can lose in practice (the bound: never 5% slower).
REQUIRED_GAIN = 1.05
