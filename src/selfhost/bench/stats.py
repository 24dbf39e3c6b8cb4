"""Statistics of one level: latency percentiles, throughput, error counts.

Percentiles interpolate linearly between order statistics (numpy's default
"linear" method), so p50 of [1, 2, 3, 4] is 2.5. Throughput counts only requests
that succeeded, over the level's wall time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from selfhost.bench.record import ERROR_KINDS, RequestRecord
from selfhost.bench.runner import LevelRun

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of non-empty `values`, linearly interpolated."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency series, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        quantiles = {name: percentile(values, q) for name, q in QUANTILES.items()}
        return cls(count=len(values), mean=sum(values) / len(values), **quantiles)


def in_flight(records: Sequence[RequestRecord]) -> tuple[int, float]:
    """(max, time-weighted mean) number of requests in flight, from timestamps."""
    if not records:
        return 0, 0.0
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    current = peak = 0
    for _, step in events:  # ends sort before starts at equal times: (t, -1) < (t, 1)
        current += step
        peak = max(peak, current)
    span_s = max(r.end_s for r in records) - min(r.start_s for r in records)
    mean = sum(r.e2e_s for r in records) / span_s if span_s > 0 else float(peak)
    return peak, mean


@dataclass(frozen=True)
class LevelStats:
    label: str
    concurrency: int | None
    request_rate: float | None
    completed: bool
    num_requests: int
    num_ok: int
    errors: dict[str, int]
    duration_s: float
    request_s: float
    output_tok_s: float
    input_tok_s: float
    total_output_tokens: int
    total_input_tokens: int
    max_in_flight: int
    mean_in_flight: float
    tokens_source: str | None
    ttft_s: Distribution | None
    tpot_s: Distribution | None
    itl_s: Distribution | None
    e2e_s: Distribution | None

    @property
    def num_errors(self) -> int:
        return self.num_requests - self.num_ok

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["num_errors"] = self.num_errors
        return out


def level_stats(run: LevelRun) -> LevelStats:
    records = run.records
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    duration_s = run.duration_s
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    sources = {r.tokens_source for r in ok}
    peak, mean = in_flight(records)

    def rate(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    return LevelStats(
        label=run.level.label,
        concurrency=run.level.concurrency,
        request_rate=run.level.request_rate,
        completed=run.completed,
        num_requests=len(records),
        num_ok=len(ok),
        errors={kind: errors.get(kind, 0) for kind in ERROR_KINDS},
        duration_s=duration_s,
        request_s=rate(len(ok)),
        output_tok_s=rate(out_tokens),
        input_tok_s=rate(in_tokens),
        total_output_tokens=out_tokens,
        total_input_tokens=in_tokens,
        max_in_flight=peak,
        mean_in_flight=mean,
        tokens_source=(sources.pop() if len(sources) == 1 else "mixed") if sources else None,
        ttft_s=Distribution.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Distribution.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=Distribution.of([gap for r in ok for gap in r.itl_s]),
        e2e_s=Distribution.of([r.e2e_s for r in ok]),
    )
