"""Split a document into token-counted chunks that overlap.

Chunks are packed from whole paragraphs when they fit, else whole sentences,
and only a sentence longer than the budget is cut mid-way (by words). Each
chunk after the first starts with the last sentences of the one before it, up
to `overlap_tokens`, so a fact that straddles a boundary is whole in one chunk.
Token counts come from the embedding model's own tokenizer, so a chunk never
gets truncated by the embedder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from selfhost.errors import InvalidParameterError

CountTokens = Callable[[Sequence[str]], list[int]]

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


@dataclass(frozen=True)
class ChunkConfig:
    max_tokens: int = 200
    overlap_tokens: int = 40

    def __post_init__(self):
        if self.max_tokens < 8:
            raise InvalidParameterError(f"chunk max_tokens must be >= 8, got {self.max_tokens}")
        # Overlap above half a chunk would embed most text twice or more.
        if not 0 <= self.overlap_tokens <= self.max_tokens // 2:
            raise InvalidParameterError(
                f"chunk overlap_tokens must be in [0, {self.max_tokens // 2}] for max_tokens "
                f"{self.max_tokens}, got {self.overlap_tokens}"
            )


@dataclass(frozen=True)
class _Unit:
    """A paragraph or sentence (or a piece of an over-long sentence) and its size."""

    text: str
    num_tokens: int
    starts_paragraph: bool


def _split_long(text: str, num_tokens: int, budget: int, count: CountTokens) -> list[tuple[str, int]]:
    """Cut a sentence that alone exceeds the budget into word runs that fit."""
    words = text.split()
    word_tokens = count(words)
    pieces, current, current_tokens = [], [], 0
    for word, n in zip(words, word_tokens):
        if current and current_tokens + n > budget:
            pieces.append(" ".join(current))
            current, current_tokens = [], 0
        current.append(word)
        current_tokens += n
    if current:
        pieces.append(" ".join(current))
    return list(zip(pieces, count(pieces)))


def _units(text: str, budget: int, count: CountTokens) -> list[_Unit]:
    """Paragraphs that fit the budget stay whole; larger ones become sentences."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    units: list[_Unit] = []
    for paragraph, n in zip(paragraphs, count(paragraphs)):
        if n <= budget:
            units.append(_Unit(paragraph, n, True))
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]
        first = True
        for sentence, m in zip(sentences, count(sentences)):
            pieces = [(sentence, m)] if m <= budget else _split_long(sentence, m, budget, count)
            for piece, k in pieces:
                units.append(_Unit(piece, k, first))
                first = False
    return units


def _join(units: Sequence[_Unit]) -> str:
    parts = []
    for i, unit in enumerate(units):
        if i:
            parts.append("\n\n" if unit.starts_paragraph else " ")
        parts.append(unit.text)
    return "".join(parts)


def chunk_text(text: str, count: CountTokens, config: ChunkConfig = ChunkConfig()) -> list[str]:
    """Chunks of at most about `config.max_tokens` tokens, in document order.

    Sizes are sums of per-unit counts; joining pieces can shift a count by a
    token or two, which is why callers leave a little headroom under the
    model's limit.
    """
    units = _units(text, config.max_tokens, count)
    chunks: list[str] = []
    current: list[_Unit] = []
    current_tokens = 0
    for unit in units:
        if current and current_tokens + unit.num_tokens > config.max_tokens:
            chunks.append(_join(current))
            # Carry the tail of this chunk forward as overlap, never the whole of it.
            carried: list[_Unit] = []
            carried_tokens = 0
            for previous in reversed(current[1:]):
                if carried_tokens + previous.num_tokens > config.overlap_tokens:
                    break
                carried.insert(0, previous)
                carried_tokens += previous.num_tokens
            if carried_tokens + unit.num_tokens > config.max_tokens:
                carried, carried_tokens = [], 0
            current, current_tokens = carried, carried_tokens
        current.append(unit)
        current_tokens += unit.num_tokens
    if current:
        chunks.append(_join(current))
    return chunks
