"""The result of a bench run and its JSON file, the contract other tools read.

`selfhost cost` (and anyone else) needs one number, the top-level
`output_tok_s`: output tokens per second at the best level. The full shape is
documented in docs/BENCH.md; bump SCHEMA when it changes incompatibly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfhost.bench.stats import LevelStats
from selfhost.errors import SelfhostError

SCHEMA = "selfhost.bench/1"
MODES = ("http", "offline")


class ResultFileError(SelfhostError):
    """A result file that is missing or is not a selfhost bench result."""


@dataclass(frozen=True)
class RunInfo:
    """What was measured. For offline runs `url` and `api` are None."""

    mode: str
    model: str
    url: str | None = None
    api: str | None = None
    backend: str | None = None
    quantization: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")


@dataclass(frozen=True)
class BenchResult:
    info: RunInfo
    workload: dict[str, Any]
    levels: tuple[LevelStats, ...]
    started_at: str  # ISO 8601, UTC
    finished_at: str
    interrupted: bool
    tracking: dict[str, str] | None = None  # uri, experiment, run_id

    @property
    def best(self) -> LevelStats | None:
        """The level with the highest output throughput among those with successes."""
        served = [level for level in self.levels if level.num_ok > 0]
        return max(served, key=lambda level: level.output_tok_s) if served else None

    @property
    def output_tok_s(self) -> float | None:
        best = self.best
        return best.output_tok_s if best else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "schema": SCHEMA,
            "mode": self.info.mode,
            "endpoint": {k: v for k, v in asdict(self.info).items() if k != "mode"},
            "workload": self.workload,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "interrupted": self.interrupted,
            "output_tok_s": best.output_tok_s if best else None,
            "best_level": best.label if best else None,
            "levels": [level.to_dict() for level in self.levels],
            "tracking": self.tracking,
        }


def write_result(result: BenchResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_output_tok_s(path: str | Path) -> float:
    """Measured output tokens/s of a result file, for `selfhost cost`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResultFileError(f"cannot read bench result {str(path)!r}: {err}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultFileError(f"{str(path)!r} is not a {SCHEMA} result file")
    value = data.get("output_tok_s")
    if not isinstance(value, (int, float)):
        raise ResultFileError(f"{str(path)!r} has no successful level, so no output_tok_s")
    return float(value)
