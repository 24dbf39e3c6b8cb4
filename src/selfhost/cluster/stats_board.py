"""StatsBoard: where every engine replica posts its figures, and the front end reads them all.

A Ray Serve handle reaches some replica, never a chosen one, so replicas push:
each sends its stats every second; a replica silent for `STALE_S` (dead, or
scaled away) drops off the board. One replica of its own (no CPU reserved).
"""

from __future__ import annotations

import time
from typing import Any

STALE_S = 5.0


class StatsBoard:
    def __init__(self):
        self._latest: dict[str, dict[str, Any]] = {}

    def report(self, stats: dict[str, Any]) -> None:
        self._latest[stats["replica"]] = {**stats, "received": time.monotonic()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """replica id -> its latest stats, for replicas heard from within STALE_S."""
        now = time.monotonic()
        for replica in [r for r, s in self._latest.items() if now - s["received"] > STALE_S]:
            del self._latest[replica]
        return dict(self._latest)
