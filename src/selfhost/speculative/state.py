"""What speculation keeps: each sequence's state between proposing and verifying, and the engine's totals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfhost.speculative.adaptive import AcceptanceCounts
from selfhost.speculative.ngram import NgramIndex


@dataclass
class SequenceSpeculation:
    """One sequence's speculative state."""

    ngram: NgramIndex | None = None
    eligible: bool = False  # sampling whose verification needs no per-token replay (Speculator.can_speculate)
    greedy: bool = True
    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)  # this sequence's kept proposals
    evidence: tuple = ()  # what the pending proposal rests on (AcceptanceModel's key)
    last_proposed: int = -1  # the speculator's step count when it last proposed (probes go to the longest idle)
    draft: object | None = None  # DraftSequence: the draft model's KV for this sequence
    draft_probs: torch.Tensor | None = None  # q rows of the pending proposal (sampled requests, draft model)
    lookup: list[int] = field(default_factory=list)  # prompt lookup's tokens for this step, before the plan cuts them


@dataclass(frozen=True)
class SpeculationStats:
    proposed_tokens: int
    accepted_tokens: int
    verifications: int  # sequence-steps that verified a proposal
    steps_with_proposals: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens appended per verification: the accepted proposals plus the target's own token."""
        return (self.accepted_tokens + self.verifications) / self.verifications if self.verifications else 0.0
