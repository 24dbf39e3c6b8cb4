"""Fit retrieved sources into a model's context window, with room left for the answer.

A small model's window (the demo model reads 256 tokens) holds only a chunk or
two next to the grounding rules, the question and the answer. Rather than fail
on a prompt that is too long, the answer shrinks first (down to a floor), then
the lowest-ranked sources are dropped, and the next one is cut short to use the
room that is left. Sources keep their rank order and their [n] numbers.

The prompt is measured, not estimated: the caller counts it with the model's
own tokenizer and chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

from selfhost.errors import InvalidParameterError

# A source cut to fewer tokens than this is dropped instead (unless it is the only one).
MIN_CUT_SOURCE_TOKENS = 32
CUT_MARK = " …"

# Counts the prompt built from these sources, in tokens of the model (chat template included).
CountPrompt = Callable[[list], int]

_WORD_END = re.compile(r"\s+")


@dataclass(frozen=True)
class PromptBudget:
    """What a model can take: its window and how it counts chat messages (tokenizer + chat template)."""

    context_tokens: int
    max_tokens: int  # the answer length asked for
    count_tokens: Callable[[list[dict]], int]


@dataclass(frozen=True)
class FittedSources:
    sources: list  # what the prompt holds, in rank order; the last one may be cut short
    max_tokens: int  # room the answer keeps (at most what was asked for)
    requested_max_tokens: int
    context_tokens: int
    num_retrieved: int
    num_cut: int  # 0 or 1: the last source kept lost its tail

    @property
    def num_dropped(self) -> int:
        return self.num_retrieved - len(self.sources)

    def note(self) -> str | None:
        """One line for the user when anything was dropped, cut or shortened; None when all fitted."""
        parts = []
        if self.num_dropped:
            parts.append(f"{self.num_dropped} of {self.num_retrieved} sources dropped")
        if self.num_cut:
            parts.append(f"source [{self.sources[-1].number}] cut short")
        if self.max_tokens < self.requested_max_tokens:
            parts.append(f"answer limited to {self.max_tokens} tokens (asked for {self.requested_max_tokens})")
        if not parts:
            return None
        return f"to fit the model's {self.context_tokens}-token context: " + "; ".join(parts)


def answer_floor(context_tokens: int, max_tokens: int) -> int:
    """The answer gives up room to sources down to a quarter of the window, never below it."""
    return min(max_tokens, context_tokens // 4)


def fit_sources(
    sources: list,
    count_prompt: CountPrompt,
    context_tokens: int,
    max_tokens: int,
    min_answer_tokens: int | None = None,
) -> FittedSources:
    """The most of `sources` (rank order) whose prompt leaves at least `min_answer_tokens` for the answer.

    `min_answer_tokens` defaults to `answer_floor(...)`; pass `max_tokens` to never shorten the answer.
    Raises InvalidParameterError when not even a cut top source fits.
    """
    floor = answer_floor(context_tokens, max_tokens) if min_answer_tokens is None else min_answer_tokens

    def fitted(kept: list, num_cut: int = 0) -> FittedSources:
        room = context_tokens - count_prompt(kept)
        return FittedSources(kept, min(max_tokens, room), max_tokens, context_tokens, len(sources), num_cut)

    if count_prompt(sources) + floor <= context_tokens:
        return fitted(sources)
    budget = context_tokens - floor  # prompt tokens allowed
    kept = list(sources)
    while kept and count_prompt(kept) > budget:
        kept.pop()
    cut = _cut(sources[len(kept)], kept, count_prompt, budget)
    if cut is not None:
        return fitted([*kept, cut], num_cut=1)
    if not kept:
        bare = count_prompt([replace(sources[0], text="")])
        raise InvalidParameterError(
            f"the instructions and question take {bare} tokens of the model's {context_tokens}-token context, "
            f"which leaves no room for a source and a {floor}-token answer; shorten the question or the answer"
        )
    return fitted(kept)


def _cut(source, kept: list, count_prompt: CountPrompt, budget: int):
    """`source` shortened at a word boundary to fit after `kept`, or None when too little of it would fit."""
    room = budget - count_prompt([*kept, replace(source, text=CUT_MARK)])
    if room < (MIN_CUT_SOURCE_TOKENS if kept else 1):
        return None
    text = source.text
    ends = [m.start() for m in _WORD_END.finditer(text) if m.start() > 0]  # candidate cut points, increasing

    def shortened(i: int):
        return replace(source, text=text[: ends[i]] + CUT_MARK)

    lo, hi = 0, len(ends)  # the answer is the number of candidate cuts that fit: ends[:answer]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_prompt([*kept, shortened(mid - 1)]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return shortened(lo - 1) if lo else None
