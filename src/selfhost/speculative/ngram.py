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

    Keeps where each pair of consecutive tokens ended and where each token last occurred. Every
    match of two tokens or more ends at an earlier occurrence of the last two tokens, so a proposal
    measures how far back only those extend (most recent first); with none, the longest match is
    the last token's most recent earlier occurrence. A sequence's tokens only ever grow, so the
    index catches up on the new ones at each call (all but the last token: its occurrences are the
    candidates' ends, never the suffix itself)."""

    proposer: NgramProposer
    _pair_ends: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    _last_seen: dict[int, int] = field(default_factory=dict)
    _indexed: int = 0  # tokens[:_indexed] are in the maps

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return self.lookup(tokens, k)[0]

    def lookup(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """`propose`, and the length of the suffix it matched (the longer, the likelier it is kept)."""
        last = len(tokens) - 1
        if self._indexed < last:
            self._catch_up(tokens, last)
        if k < 1 or last < self.proposer.min_ngram:
            return [], 0
        longest = min(self.proposer.max_ngram, last)
        best_len, best_end = 0, -1
        if longest >= 2:
            for end in reversed(self._pair_ends.get((tokens[last - 1], tokens[last]), ())):  # most recent first
                n = 2
                while n < longest and end - n >= 0 and tokens[end - n] == tokens[last - n]:
                    n += 1
                if n > best_len:
                    best_len, best_end = n, end
                    if n == longest:
                        break
        if best_len == 0:
            best_end = self._last_seen.get(tokens[last], -1)
            best_len = 1 if best_end >= 0 else 0
        if best_len < self.proposer.min_ngram:
            return [], 0
        return tokens[best_end + 1:best_end + 1 + k], best_len

    def _catch_up(self, tokens: list[int], upto: int) -> None:
        pair_ends, last_seen = self._pair_ends, self._last_seen
        previous = tokens[self._indexed - 1] if self._indexed else None
        for i in range(self._indexed, upto):
            token = tokens[i]
            if previous is not None:
                ends = pair_ends.get((previous, token))
                if ends is None:
                    pair_ends[(previous, token)] = [i]
                else:
                    ends.append(i)
            last_seen[token] = i
            previous = token
        self._indexed = upto
