"""Read bench runs back from MLflow: list recent ones, compare some side by side.

Run ids may be shortened to any unique prefix (at least 6 characters), as
`selfhost runs list` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table

from selfhost.bench.tracking import RUN_KIND_TAG, TrackingError, mlflow_error_type, experiment_id, open_client

SQLITE_PREFIX = "sqlite:///"
MIN_PREFIX = 6
SHORT_ID = 8
COMPARED_PARAMS = ("endpoint", "model", "backend", "quantization", "device", "mode", "concurrency",
                   "request_rate", "workload")
HEADLINE_METRICS = ("output_tok_s", "request_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                    "e2e_p99_s", "error_rate")
PER_LEVEL_METRICS = ("output_tok_s", "ttft_p99_s", "tpot_p50_s", "num_errors")
_LEVEL_KEY = re.compile(r"^(?P<label>[cr][0-9.]+)\.(?P<metric>.+)$")


def _search(client: Any, exp_id: str, max_results: int) -> list[Any]:
    try:
        return client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KIND_TAG}` = 'bench'",
            order_by=["attributes.start_time DESC"], max_results=max_results,
        )
    except mlflow_error_type() as err:
        raise TrackingError(f"cannot search runs in {client.tracking_uri!r}: {err.message}") from None


def _open_existing(tracking_uri: str) -> Any:
    """Open a store for reading; a missing SQLite file is an error, not a new empty store."""
    if tracking_uri.startswith(SQLITE_PREFIX) and not Path(tracking_uri[len(SQLITE_PREFIX):]).exists():
        raise TrackingError(
            f"no MLflow store at {tracking_uri!r}: run `selfhost bench` here first, or pass --tracking-uri"
        )
    return open_client(tracking_uri)


def recent_runs(tracking_uri: str, experiment: str, limit: int = 20) -> list[Any]:
    client = _open_existing(tracking_uri)
    exp_id = experiment_id(client, experiment, create=False)
    return [] if exp_id is None else _search(client, exp_id, limit)


def find_runs(tracking_uri: str, experiment: str, run_ids: Sequence[str]) -> list[Any]:
    """Runs by full id or unique prefix, in the order given."""
    client = _open_existing(tracking_uri)
    exp_id = experiment_id(client, experiment, create=False)
    known = _search(client, exp_id, 5000) if exp_id is not None else []
    found = []
    for wanted in run_ids:
        if len(wanted) < MIN_PREFIX:
            raise TrackingError(f"run id {wanted!r} is too short; give at least {MIN_PREFIX} characters")
        matches = [run for run in known if run.info.run_id.startswith(wanted)]
        if len(matches) != 1:
            what = "matches no" if not matches else f"matches {len(matches)}"
            raise TrackingError(
                f"run id {wanted!r} {what} bench run in experiment {experiment!r} at {tracking_uri!r}"
            )
        found.append(matches[0])
    return found


def _when(run: Any) -> str:
    stamp = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).astimezone()
    return stamp.strftime("%Y-%m-%d %H:%M")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def runs_table(runs: Sequence[Any]) -> Table:
    table = Table(title="bench runs, newest first")
    for name in ("run id", "started", "status", "model", "backend", "device", "levels", "out tok/s", "TTFT p50 ms"):
        # Ids are what users copy into `runs compare`: never wrap them.
        table.add_column(name, no_wrap=name == "run id", min_width=SHORT_ID if name == "run id" else None)
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        ttft = metrics.get("ttft_p50_s")
        table.add_row(
            run.info.run_id[:SHORT_ID], _when(run), run.info.status, params.get("model", "-"),
            params.get("backend", "-"), params.get("device", "-"),
            params.get("request_rate") and f"rate {params['request_rate']}" or f"c {params.get('concurrency', '-')}",
            _num(metrics.get("output_tok_s")), _num(ttft * 1000 if ttft is not None else None),
        )
    return table


def compare_table(runs: Sequence[Any]) -> Table:
    """Runs as columns; params, headline metrics (best level), then per level."""
    table = Table(title="bench runs compared (headline metrics are at each run's best level)")
    table.add_column("", no_wrap=True)
    for run in runs:
        table.add_column(run.info.run_id[:SHORT_ID], justify="right", min_width=SHORT_ID)
    table.add_row("started", *[_when(run) for run in runs])
    table.add_row("status", *[run.info.status for run in runs])
    for name in COMPARED_PARAMS:
        table.add_row(name, *[run.data.params.get(name, "-") for run in runs])
    table.add_section()
    for name in HEADLINE_METRICS:
        table.add_row(name, *[_num(run.data.metrics.get(name)) for run in runs])
    labels = sorted(
        {m["label"] for run in runs for key in run.data.metrics if (m := _LEVEL_KEY.match(key))},
        key=lambda label: (label[0], float(label[1:])),
    )
    for label in labels:
        table.add_section()
        for name in PER_LEVEL_METRICS:
            key = f"{label}.{name}"
            table.add_row(key, *[_num(run.data.metrics.get(key)) for run in runs])
    return table
