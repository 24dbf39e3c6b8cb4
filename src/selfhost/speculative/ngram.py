"""Prompt lookup: propose what followed the last time the context's most recent n-gram occurred.

No second model: the proposal is a copy from the sequence's own tokens (prompt and output).
It pays off where the answer quotes its context (RAG answers, code edits, summaries), and
proposes nothing where nothing repeats, so a verifying step costs no more than a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NgramProposer:
    """max_ngram..min_ngram: the suffix lengths tried, longest first (a longer match is a better bet)."""

    min_ngram: int = 2
    max_ngram: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}..{self.max_ngram}")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix.

        The plain scan, the definition `NgramIndex` must agree with."""
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


@dataclass
class NgramIndex:
    """`NgramProposer.propose` for one growing sequence, without rescanning it every step.

    Keeps where each token occurred; a proposal looks only at the earlier occurrences of the
    last token and measures how far each one's match extends backwards. A sequence's tokens
    only ever grow, so the index catches up on the new ones at each call."""

    proposer: NgramProposer
    _positions: dict[int, list[int]] = field(default_factory=dict)
    _indexed: int = 0  # tokens[:_indexed] are in _positions

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return self.lookup(tokens, k)[0]

    def lookup(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """`propose`, and the length of the suffix it matched (the longer, the likelier it is kept)."""
        if k < 1 or len(tokens) < self.proposer.min_ngram + 1:
            self._catch_up(tokens)
            return [], 0
        # Index everything but the last token: its occurrences are the candidates' ends.
        self._catch_up(tokens, upto=len(tokens) - 1)
        last = len(tokens) - 1
        longest = min(self.proposer.max_ngram, last)
        best_len, best_end = 0, -1
        for end in reversed(self._positions.get(tokens[last], ())):  # most recent first
            if end >= last:  # indexed by an earlier call on the same tokens: the suffix itself
                continue
            n = 1
            while n < longest and end - n >= 0 and tokens[end - n] == tokens[last - n]:
                n += 1
            if n > best_len:
                best_len, best_end = n, end
                if n == longest:
                    break
        self._catch_up(tokens)
        if best_len < self.proposer.min_ngram:
            return [], 0
        return tokens[best_end + 1:best_end + 1 + k], best_len

    def _catch_up(self, tokens: list[int], upto: int | None = None) -> None:
        upto = len(tokens) if upto is None else upto
        for i in range(self._indexed, upto):
            self._positions.setdefault(tokens[i], []).append(i)
        self._indexed = max(self._indexed, upto)
