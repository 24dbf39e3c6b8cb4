import random

import numpy as np
import pytest

from selfhost.bench.record import RequestRecord
from selfhost.bench.runner import Level, LevelRun
from selfhost.bench.stats import Distribution, in_flight, level_stats, percentile


def test_percentile_known_samples():
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5], 0.99) == 5
    assert percentile(list(range(1, 101)), 0.9) == pytest.approx(90.1)
    values = [random.Random(7).random() for _ in range(10)] + [3.0, 0.1, 7.5]
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q * 100))
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_distribution():
    dist = Distribution.of([0.1, 0.2, 0.3, 0.4, 1.0])
    assert (dist.count, dist.p50) == (5, 0.3)
    assert dist.mean == pytest.approx(0.4)
    assert Distribution.of([]) is None


def test_in_flight_from_timestamps():
    records = [RequestRecord(0, 0.0, 2.0), RequestRecord(1, 0.5, 1.0), RequestRecord(2, 1.0, 3.0)]
    peak, mean = in_flight(records)
    assert peak == 2  # the request ending at 1.0 is gone when the next starts
    assert mean == pytest.approx((2.0 + 0.5 + 2.0) / 3.0)


def test_level_stats_throughput_and_errors():
    ok = [
        RequestRecord(i, start_s=i * 1.0, end_s=i * 1.0 + 1.0, ttft_s=0.2, itl_s=(0.1,) * 8,
                      prompt_tokens=100, output_tokens=9)
        for i in range(4)
    ]
    failed = [RequestRecord(4, 0.0, 0.5, error="http", status_code=500),
              RequestRecord(5, 0.0, 4.0, error="timeout")]
    run = LevelRun(Level(2), ok + failed, duration_s=4.0, completed=True)
    stats = level_stats(run)
    assert (stats.num_requests, stats.num_ok, stats.num_errors) == (6, 4, 2)
    assert stats.errors == {"timeout": 1, "http": 1, "stream": 0, "connect": 0, "transport": 0, "engine": 0}
    assert stats.request_s == pytest.approx(1.0)
    assert stats.output_tok_s == pytest.approx(36 / 4.0)
    assert stats.input_tok_s == pytest.approx(400 / 4.0)
    assert stats.tpot_s.p50 == pytest.approx(0.1)  # (1.0 - 0.2) / (9 - 1)
    assert stats.ttft_s.p99 == pytest.approx(0.2)
    assert stats.itl_s.count == 32
    assert stats.tokens_source == "usage"
    assert stats.label == "c2"
