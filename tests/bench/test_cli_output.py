"""`selfhost bench` as a user runs it, output piped: a run where every request fails says why and
exits non-zero with its MLflow run FAILED, and the table prints whole although stdout is no terminal."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow import MlflowClient

HEADERS = ("level", "ok/sent", "errors", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
           "TPOT p99 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s", "max in flight")


def test_all_failed_run_shows_reasons_exits_1_and_marks_the_run_failed(fake, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    done = subprocess.run(
        [sys.executable, "-m", "selfhost.cli", "bench", "--url", fake.url, "--model", "http500", "--requests", "3",
         "--concurrency", "1,2", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: all 6 requests failed, so nothing was measured (reasons above)"]
    for label in ("c1", "c2"):
        assert f"{label}: 3 of 3 requests failed:\n  3 x HTTP 500: injected failure\n" in done.stdout
    # Piped, rich would assume 80 columns and cut the 13 columns to `TT…`; every header prints whole.
    assert "…" not in done.stdout and "\x1b[" not in done.stdout
    header = next(line for line in done.stdout.splitlines() if "ok/sent" in line)
    assert all(f" {name} " in header for name in HEADERS), header
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("selfhost-bench").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
