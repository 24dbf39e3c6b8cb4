"""Keep every bench run in MLflow: params, metrics, and the files as artifacts.

The default store is a SQLite file in the working directory (artifacts go next
to it, under ./mlruns); `--tracking-uri http://host:5000` points at a shared
MLflow server instead. mlflow is imported only when tracking is used, because
it costs about a second and `selfhost --help` should not pay it.

A run is opened before the load starts, so an unreachable tracking server fails
the command before any time is spent, and closed as FINISHED, KILLED when the
benchmark was interrupted, or FAILED when not one request succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfhost.bench.result import BenchResult, RunInfo
from selfhost.bench.runner import Level
from selfhost.bench.stats import LevelStats
from selfhost.bench.workload import Workload
from selfhost.errors import SelfhostError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "selfhost-bench"
RUN_KIND_TAG = "selfhost.kind"


class TrackingError(SelfhostError):
    """A tracking store that cannot be opened or written, or a run id not in it."""


def open_client(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri`, with MLflow's start-up chatter muted."""
    from mlflow import MlflowClient

    # After the import: importing mlflow sets its own logger back to INFO.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_error_type() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def experiment_id(client: Any, name: str, create: bool) -> str | None:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name) if create else None
    except mlflow_error_type() as err:
        raise TrackingError(f"cannot use MLflow store {client.tracking_uri!r}: {err.message}") from None


def level_metrics(level: LevelStats, prefix: str = "") -> dict[str, float]:
    """Flat MLflow metrics of one level, e.g. `c16.ttft_p99_s`."""
    metrics = {
        "output_tok_s": level.output_tok_s,
        "request_s": level.request_s,
        "input_tok_s": level.input_tok_s,
        "num_ok": float(level.num_ok),
        "num_errors": float(level.num_errors),
        "error_rate": level.num_errors / level.num_requests if level.num_requests else 0.0,
        "max_in_flight": float(level.max_in_flight),
    }
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        dist = getattr(level, name)
        if dist is not None:
            base = name.removesuffix("_s")
            for quantile in ("mean", "p50", "p90", "p99"):
                metrics[f"{base}_{quantile}_s"] = getattr(dist, quantile)
    return {prefix + key: value for key, value in metrics.items()}


@dataclass(frozen=True)
class TrackedRun:
    client: Any
    experiment: str
    run_id: str

    def describe(self) -> dict[str, str]:
        """Where the run lives, for the result file."""
        return {"uri": self.client.tracking_uri, "experiment": self.experiment, "run_id": self.run_id}

    def finish(self, result: BenchResult, files: Mapping[str, Path]) -> None:
        """Log metrics (best level unprefixed, every level as `<label>.<metric>`),
        the artifacts, and close the run."""
        metrics: dict[str, float] = {}
        if result.best is not None:
            metrics.update(level_metrics(result.best))
        for level in result.levels:
            metrics.update(level_metrics(level, prefix=f"{level.label}."))
        status = "KILLED" if result.interrupted else "FINISHED" if result.best is not None else "FAILED"
        self.close(metrics, files.values(), tags={"interrupted": str(result.interrupted).lower()}, status=status)

    def close(
        self, metrics: Mapping[str, float], files: Iterable[Path] = (), tags: Mapping[str, str] | None = None,
        status: str = "FINISHED",
    ) -> None:
        """Log flat metrics, tags and files, and end the run with `status` (any kind of run)."""
        try:
            from mlflow.entities import Metric

            stamp_ms = _now_ms()
            batch = [Metric(key, float(value), stamp_ms, 0) for key, value in metrics.items()]
            for start in range(0, len(batch), 500):  # MLflow caps a batch at 1000 metrics
                self.client.log_batch(self.run_id, metrics=batch[start : start + 500])
            for key, value in (tags or {}).items():
                self.client.set_tag(self.run_id, key, value)
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status)
        except mlflow_error_type() as err:
            raise TrackingError(f"cannot log run {self.run_id} to {self.client.tracking_uri!r}: {err.message}") from None


    def fail(self) -> None:
        """Close the run as FAILED when the command dies before `finish`."""
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except mlflow_error_type():
            pass  # already failing; the original error is the one to show


def _now_ms() -> int:
    return int(time.time() * 1000)


def start_run(
    tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any], kind: str = "bench"
) -> TrackedRun:
    """Open a RUNNING run holding `params` (None values are left out), tagged with its kind."""
    client = open_client(tracking_uri)
    exp_id = experiment_id(client, experiment, create=True)
    try:
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_KIND_TAG: kind})
        from mlflow.entities import Param

        clean = [Param(key, str(value)) for key, value in params.items() if value is not None]
        client.log_batch(run.info.run_id, params=clean)
    except mlflow_error_type() as err:
        raise TrackingError(f"cannot start a run in {tracking_uri!r}: {err.message}") from None
    return TrackedRun(client, experiment, run.info.run_id)


def run_params(
    info: RunInfo, workload: Workload, levels: list[Level], timeout_s: float | None, warmup_requests: int = 0
) -> dict[str, Any]:
    """The params every bench run logs, so runs can be filtered and compared."""
    concurrency = sorted({level.concurrency for level in levels if level.concurrency is not None})
    rates = [level.request_rate for level in levels if level.request_rate is not None]
    return {
        "mode": info.mode,
        "endpoint": info.url,
        "api": info.api,
        "model": info.model,
        "backend": info.backend or "unknown",
        "quantization": info.quantization or "unknown",
        "device": info.device or "unknown",
        "concurrency": ",".join(map(str, concurrency)) if concurrency else "unbounded",
        "request_rate": ",".join(f"{rate:g}" for rate in rates) or None,
        "workload": workload.describe(),
        "prompt_tokens": workload.prompt_tokens,
        "output_tokens": workload.output_tokens,
        "dataset": None if workload.source == "synthetic" else workload.source,
        "num_requests": len(workload.requests),
        "seed": workload.seed,
        "timeout_s": timeout_s,
        "warmup_requests": warmup_requests,
    }
