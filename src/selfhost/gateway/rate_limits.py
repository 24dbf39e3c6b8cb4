"""Requests and tokens per minute per virtual key, over a sliding 60-second window.

Each admitted request enters its key's window with its estimated tokens (prompt at
four characters a token plus its output cap); when it completes, the estimate is
replaced by the tokens it really used. A request is refused (429,
`rate_limit_exceeded`) when the window already holds `rpm` requests, or when its
estimate would take the window past `tpm` tokens.
"""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 60.0


class RateEntry:
    """One admitted request's place in its key's window (`tokens` is corrected on completion)."""

    __slots__ = ("admitted_at", "tokens")

    def __init__(self, admitted_at: float, tokens: int):
        self.admitted_at, self.tokens = admitted_at, tokens


class RateLimiter:
    def __init__(self):
        self._windows: dict[str, deque[RateEntry]] = {}

    def admit(self, key_name: str, rpm: int | None, tpm: int | None, estimated_tokens: int) -> RateEntry | str:
        """The request's window entry, or why it is refused."""
        now = time.monotonic()
        window = self._windows.setdefault(key_name, deque())
        while window and window[0].admitted_at <= now - WINDOW_S:
            window.popleft()
        if rpm is not None and len(window) >= rpm:
            return f"{len(window)} requests in the last minute (limit {rpm} a minute)"
        if tpm is not None:
            used = sum(entry.tokens for entry in window)
            if used + estimated_tokens > tpm:
                return (f"{used} tokens in the last minute and about {estimated_tokens} more asked for "
                        f"(limit {tpm} a minute)")
        entry = RateEntry(now, estimated_tokens)
        window.append(entry)
        return entry
