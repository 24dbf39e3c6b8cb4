"""Load levels against the loopback server: concurrency held, rates, seeds, interruption."""

import asyncio
import time

import pytest

from selfhost.bench.client import EndpointClient, EndpointConfig
from selfhost.bench.dist import parse_length_dist
from selfhost.bench.runner import Level, LevelRun, plan_levels, run_level, run_levels
from selfhost.bench.stats import level_stats
from selfhost.bench.workload import synthetic_workload
from selfhost.errors import InvalidParameterError


def workload(n, seed=0):
    return synthetic_workload(n, parse_length_dist("uniform:5-30"), parse_length_dist("fixed:4"), seed=seed)


def run(url, model, requests, levels, seed=0):
    """Run `levels`, each sending the same `requests`."""
    runs: list[LevelRun] = []

    async def go():
        async with EndpointClient(EndpointConfig(url, model, timeout_s=5)) as client:
            await run_levels(client.send, [requests] * len(levels), levels, runs, seed)

    asyncio.run(go())
    return runs


def test_levels_plan():
    assert plan_levels(None, None) == [Level(1), Level(4), Level(16), Level(64)]
    assert plan_levels([2, 8], None) == [Level(2), Level(8)]
    assert plan_levels([8], [1.5, 3]) == [Level(8, 1.5), Level(8, 3)]
    assert plan_levels(None, [2]) == [Level(None, 2)]
    with pytest.raises(InvalidParameterError, match=r"\[2, 8\]"):
        plan_levels([2, 8], [1])
    with pytest.raises(InvalidParameterError, match="-3"):
        Level(-3)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_level_keeps_that_many_in_flight(fake, concurrency):
    # No token until `concurrency` requests are in flight: a runner that keeps fewer times out.
    fake.state.reset(ttft_s=0.04, itl_s=0.01, gather=concurrency)
    (level_run,) = run(fake.url, "ok", workload(12).requests, [Level(concurrency)])
    stats = level_stats(level_run)
    assert stats.num_ok == 12 and level_run.completed
    assert fake.state.max_in_flight == concurrency  # seen by the server
    assert stats.max_in_flight == concurrency  # and from client timestamps
    assert stats.output_tok_s == pytest.approx(12 * 4 / level_run.duration_s)


def test_poisson_rate_paces_arrivals(fake):
    fake.state.reset(ttft_s=0.01, itl_s=0.005)
    (level_run,) = run(fake.url, "ok", workload(20).requests, [Level(None, 40.0)], seed=1)
    gaps = [b - a for a, b in zip(fake.state.arrivals_s, fake.state.arrivals_s[1:])]
    assert level_run.completed and len(level_run.records) == 20
    # 19 exponential gaps with mean 25 ms: the sum is 475 ms +- ~110 ms (1 sd)
    assert 0.15 < sum(gaps) < 1.2
    assert len({round(g, 3) for g in gaps}) > 5  # irregular, not a fixed interval


def test_same_seed_sends_identical_requests(fake):
    fake.state.reset(ttft_s=0.0, itl_s=0.0)
    run(fake.url, "ok", workload(6, seed=5).requests, [Level(2)])
    first = sorted(fake.state.bodies, key=lambda b: b["messages"][0]["content"])
    fake.state.reset(ttft_s=0.0, itl_s=0.0)
    run(fake.url, "ok", workload(6, seed=5).requests, [Level(3)])
    second = sorted(fake.state.bodies, key=lambda b: b["messages"][0]["content"])
    assert first == second and len(first) == 6


def test_errors_are_counted_per_level(fake):
    fake.state.reset(ttft_s=0.0, itl_s=0.0)
    (level_run,) = run(fake.url, "flaky", workload(9).requests, [Level(1)])
    stats = level_stats(level_run)
    assert (stats.num_ok, stats.errors["http"]) == (6, 3)


def test_cancelled_level_keeps_finished_records(fake):
    fake.state.reset(ttft_s=0.05, itl_s=0.01)
    level_run = LevelRun(Level(1))

    async def go():
        async with EndpointClient(EndpointConfig(fake.url, "ok")) as client:
            task = asyncio.create_task(run_level(client.send, workload(100).requests, level_run))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    started = time.perf_counter()
    asyncio.run(go())
    assert 1 <= len(level_run.records) < 100
    assert not level_run.completed
    assert 0.4 < level_run.duration_s < time.perf_counter() - started
