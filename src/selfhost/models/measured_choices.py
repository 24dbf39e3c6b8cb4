"""Kernel choices measured on this CPU, cached on disk so later loads skip the probe.

A file per kind of choice (`MeasuredChoices("weight_precision")` -> weight_precision.json)
under the user's cache directory (SELFHOST_CACHE_DIR, else XDG_CACHE_HOME/selfhost, else
~/.cache/selfhost). Entries are keyed by CPU model, ISA flags, the caller's own parts (a shape,
a thread count) and selfhost's version: a measurement on one CPU says nothing about another,
and a new kernel deserves a new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from selfhost.cpu_identity import read_cpu_identity

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("SELFHOST_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfhost"
    return Path(root)


class MeasuredChoices:
    def __init__(self, name: str):
        self.name = name

    @property
    def path(self) -> Path:  # read per use: tests and tools point SELFHOST_CACHE_DIR elsewhere
        return cache_dir() / f"{self.name}.json"

    @staticmethod
    def key(*parts: object) -> str:
        from selfhost import __version__

        cpu = read_cpu_identity()
        return "|".join([cpu.model, ",".join(cpu.isa_flags), *map(str, parts), f"selfhost {__version__}"])

    def read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
            return entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):  # none yet, or unreadable: measure again
            return {}

    def get(self, key: str):
        return self.read().get(key)

    def seconds(self, parts: tuple, count: int, measure: Callable[[], dict[str, float]]) -> tuple[dict[str, float], bool]:
        """The timings cached under these key parts (`count` positive numbers), else `measure()`'s, then
        cached; and whether they came from the cache."""
        key = self.key(*parts)
        cached = self.get(key)
        if (isinstance(cached, dict) and len(cached) == count
                and all(isinstance(v, (int, float)) and v > 0 for v in cached.values())):
            return cached, True
        measured = measure()
        self.put(key, measured)
        return measured, False

    def put(self, key: str, value) -> None:
        path, entries = self.path, self.read()
        entries[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(entries, indent=1, sort_keys=True))
            scratch.replace(path)  # atomic: a concurrent loader reads the old file or the new one
        except OSError as err:  # a read-only home: the choice still holds for this process
            log.debug("could not cache the %s choice in %s: %s", self.name, path, err)


def takeover_rows(incumbent: dict[int, float], challenger: dict[int, float], min_gain: float) -> int | None:
    """The fewest probed rows R from which a challenger kernel takes over from an incumbent: it must win
    by `min_gain` both at R and over all probes of R rows and more summed (the big steps, where the time
    goes, weigh most, and one disturbed probe above R does not flip the answer on its own), and R may not
    be the last probe (a win there would rest on that one probe: on a Xeon with AMX, 2026-12-07, a
    probe taken under load had put the int8 widened product's switch at the last probe, 512 rows, where
    two quiet measurements found it never wins); None where it never does. Both map probed row counts
    to best-of-n seconds."""
    probes = sorted(incumbent)

    def wins(rows: list[int]) -> bool:
        return min_gain * sum(challenger[r] for r in rows) <= sum(incumbent[r] for r in rows)

    return next((r for r in probes[:-1] if wins([r]) and wins([s for s in probes if s >= r])), None)
