"""How many tokens to propose: follow each sequence's recent acceptance.

A proposal costs a wider verifying step; accepted tokens are the gain. When recent proposals
were mostly rejected the length shrinks (to zero: a plain decode step, so text with nothing
to copy is not slowed), and grows again as they are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdaptiveLength:
    max_tokens: int
    smoothing: float = 0.3  # weight of the latest step in the running acceptance rate
    acceptance: float = 1.0  # optimistic start: try full proposals first
    probe_every: int = 8  # at length 0, still propose one token this often, to notice a change

    _steps_at_zero: int = 0

    def next_length(self) -> int:
        length = round(self.acceptance * self.max_tokens)
        if length > 0:
            self._steps_at_zero = 0
            return length
        self._steps_at_zero += 1
        return 1 if self._steps_at_zero % self.probe_every == 0 else 0

    def record(self, proposed: int, accepted: int) -> None:
        if proposed > 0:
            rate = accepted / proposed
            self.acceptance = (1 - self.smoothing) * self.acceptance + self.smoothing * rate
