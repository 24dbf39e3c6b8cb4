"""Prompt lookup: propose what followed the last time the context's most recent n-gram occurred.

No second model: the proposal is a copy from the sequence's own tokens (prompt and output).
It pays off where the answer quotes its context (RAG answers, code edits, summaries), and
proposes nothing where nothing repeats, so a verifying step costs no more than a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NgramProposer:
    """max_ngram..min_ngram: the suffix lengths tried, longest first (a longer match is a better bet)."""

    min_ngram: int = 2
    max_ngram: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}..{self.max_ngram}")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if k < 1:
            return []
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            # The most recent earlier occurrence: scan right to left, not overlapping the suffix itself.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow
        return []
