"""Result JSON shape, per-request records, plots, the rich table."""

import json

import pytest
from rich.console import Console

from selfhost.bench.record import RequestRecord
from selfhost.bench.report import result_table, write_outputs
from selfhost.bench.result import SCHEMA, BenchResult, ResultFileError, RunInfo, read_output_tok_s
from selfhost.bench.runner import Level, LevelRun
from selfhost.bench.stats import level_stats


def make_runs():
    runs = []
    for concurrency, per_request_s in ((1, 1.0), (4, 1.5)):
        records = [
            RequestRecord(i, start_s=0.0, end_s=per_request_s, ttft_s=0.1 * concurrency, itl_s=(0.05,) * 9,
                          prompt_tokens=20, output_tokens=10)
            for i in range(concurrency * 2)
        ]
        records.append(RequestRecord(99, 0.0, 0.2, error="stream", error_detail="dropped"))
        runs.append(LevelRun(Level(concurrency), records, duration_s=per_request_s * 2, completed=True))
    return runs


def make_result(runs, interrupted=False):
    return BenchResult(
        info=RunInfo("http", "tiny", url="http://127.0.0.1:1/v1", api="chat", backend="vllm"),
        workload={"source": "synthetic", "prompt_tokens": "fixed:20", "output_tokens": "fixed:10",
                  "num_requests": 8, "seed": 0},
        levels=tuple(level_stats(run) for run in runs),
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:01:00+00:00",
        interrupted=interrupted,
    )


def test_json_shape_plots_and_records(tmp_path):
    runs = make_runs()
    files = write_outputs(make_result(runs), runs, tmp_path / "out")
    data = json.loads(files["result"].read_text())
    assert data["schema"] == SCHEMA
    assert data["mode"] == "http" and data["endpoint"]["backend"] == "vllm"
    assert [level["label"] for level in data["levels"]] == ["c1", "c4"]
    c4 = data["levels"][1]
    assert c4["output_tok_s"] == pytest.approx(80 / 3.0)
    assert data["output_tok_s"] == c4["output_tok_s"] and data["best_level"] == "c4"
    assert c4["errors"]["stream"] == 1 and c4["num_errors"] == 1 and c4["num_ok"] == 8
    assert set(c4["ttft_s"]) == {"count", "mean", "p50", "p90", "p99"}
    assert c4["tpot_s"]["p50"] == pytest.approx((1.5 - 0.4) / 9)
    assert read_output_tok_s(files["result"]) == pytest.approx(80 / 3.0)

    lines = files["records"].read_text().splitlines()
    assert len(lines) == 3 + 9 and json.loads(lines[0])["level"] == "c1"
    for name in ("throughput_plot", "latency_plot"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert files[name].stat().st_size > 10_000


def test_table_renders(tmp_path):
    console = Console(record=True, width=200)
    console.print(result_table(make_result(make_runs(), interrupted=True)))
    text = console.export_text()
    assert "interrupted" in text and "stream 1" in text and "c4" in text


def test_read_output_tok_s_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ResultFileError, match="x.json"):
        read_output_tok_s(path)
    with pytest.raises(ResultFileError, match="nope.json"):
        read_output_tok_s(tmp_path / "nope.json")


def test_all_failed_run_has_no_throughput_and_no_plots(tmp_path):
    runs = [LevelRun(Level(1), [RequestRecord(0, 0.0, 1.0, error="http", status_code=500)], 1.0, True)]
    files = write_outputs(make_result(runs), runs, tmp_path)
    data = json.loads(files["result"].read_text())
    assert data["output_tok_s"] is None and data["best_level"] is None
    assert "throughput_plot" not in files
