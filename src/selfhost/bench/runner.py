"""Drive a workload through levels of load, keeping what finished.

A level is either closed-loop (exactly `concurrency` requests in flight, a new
one sent as soon as one finishes) or open-loop (requests arrive as a Poisson
process at `request_rate` per second, optionally capped at `concurrency` in
flight). Every level sends a full request set of the same lengths, so levels
are comparable.

Records land in caller-owned LevelRun objects as they finish, which is what lets
an interrupted run (Ctrl-C cancels the asyncio task) still report what it has.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from selfhost.bench.record import RequestRecord
from selfhost.bench.workload import BenchRequest
from selfhost.errors import InvalidParameterError

DEFAULT_CONCURRENCY = (1, 4, 16, 64)

SendFn = Callable[[BenchRequest, float], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Level:
    """One load setting. `concurrency` None means no cap (open loop only)."""

    concurrency: int | None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is None and self.request_rate is None:
            raise InvalidParameterError("a level needs a concurrency, a request rate, or both")
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidParameterError(f"concurrency {self.concurrency} must be >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise InvalidParameterError(f"request rate {self.request_rate} must be > 0 requests/s")

    @property
    def label(self) -> str:
        """Short stable name, used in tables and MLflow metric keys (c16, r2.5)."""
        return f"c{self.concurrency}" if self.request_rate is None else f"r{self.request_rate:g}"


def plan_levels(concurrency: Sequence[int] | None, request_rates: Sequence[float] | None) -> list[Level]:
    """Levels vary along one axis: concurrency (closed loop) or request rate
    (open loop, with at most one concurrency value as the in-flight cap)."""
    if not request_rates:
        return [Level(c) for c in (concurrency or DEFAULT_CONCURRENCY)]
    if concurrency and len(concurrency) > 1:
        raise InvalidParameterError(
            f"with --request-rate, --concurrency is the in-flight cap and takes one value, got {list(concurrency)}"
        )
    cap = concurrency[0] if concurrency else None
    return [Level(cap, rate) for rate in request_rates]


@dataclass
class LevelRun:
    """Records of one level, filled while it runs (hence mutable)."""

    level: Level
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    completed: bool = False


async def _closed_loop(send: SendFn, requests: Sequence[BenchRequest], run: LevelRun, zero_s: float, on_record) -> None:
    pending = iter(requests)

    async def worker() -> None:
        for request in pending:  # the shared iterator hands each request to one worker
            record = await send(request, zero_s)
            run.records.append(record)
            on_record(record)

    assert run.level.concurrency is not None
    async with asyncio.TaskGroup() as group:
        for _ in range(min(run.level.concurrency, len(requests))):
            group.create_task(worker())


async def _open_loop(
    send: SendFn, requests: Sequence[BenchRequest], run: LevelRun, zero_s: float, on_record, seed: int
) -> None:
    rng = random.Random(seed)  # same seed, same arrival times
    cap = asyncio.Semaphore(run.level.concurrency) if run.level.concurrency else None
    assert run.level.request_rate is not None

    async def one(request: BenchRequest) -> None:
        if cap is None:
            record = await send(request, zero_s)
        else:
            async with cap:
                record = await send(request, zero_s)
        run.records.append(record)
        on_record(record)

    arrival_s = 0.0
    async with asyncio.TaskGroup() as group:
        for request in requests:
            delay_s = zero_s + arrival_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            group.create_task(one(request))
            arrival_s += rng.expovariate(run.level.request_rate)


async def run_level(
    send: SendFn,
    requests: Sequence[BenchRequest],
    run: LevelRun,
    seed: int = 0,
    on_record: Callable[[RequestRecord], None] = lambda record: None,
) -> None:
    """Send every request at `run.level`, appending records to `run`."""
    zero_s = time.perf_counter()
    try:
        if run.level.request_rate is None:
            await _closed_loop(send, requests, run, zero_s, on_record)
        else:
            await _open_loop(send, requests, run, zero_s, on_record, seed)
        run.completed = True
    finally:
        # Also on cancellation: the partial level keeps a true wall time.
        run.duration_s = time.perf_counter() - zero_s


async def warm_up(send: SendFn, request: BenchRequest, count: int) -> None:
    """Send `count` unrecorded requests one after another, so one-time costs
    (lazy initialisation, first allocations, connection setup) stay out of the
    first level's figures. Their failures are ignored: the levels record them."""
    for _ in range(count):
        await send(request, time.perf_counter())


async def run_levels(
    send: SendFn,
    requests_by_level: Sequence[Sequence[BenchRequest]],
    levels: Sequence[Level],
    into: list[LevelRun],
    seed: int = 0,
    on_level: Callable[[Level], None] = lambda level: None,
    on_record: Callable[[RequestRecord], None] = lambda record: None,
) -> None:
    """Run the levels in order, level i sending `requests_by_level[i]`; each
    LevelRun is appended to `into` before it starts."""
    assert len(requests_by_level) == len(levels), (len(requests_by_level), len(levels))
    for level, requests in zip(levels, requests_by_level):
        run = LevelRun(level)
        into.append(run)
        on_level(level)
        await run_level(send, requests, run, seed, on_record)
