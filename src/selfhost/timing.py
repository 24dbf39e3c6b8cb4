"""The one way selfhost times a short piece of work it must choose by (probes, device measurements)."""

from __future__ import annotations

import time
from typing import Callable


def best_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls of run(): the least disturbed by other work on the machine.
    Callers warm up (first-call allocation, thread start) before timing."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
