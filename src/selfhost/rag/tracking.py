"""Log `selfhost rag eval` runs to MLflow, with bench/tracking.py's run handling.

One run per evaluation, in experiment `selfhost-rag-eval` of the same store
`selfhost bench` uses (default: ./mlflow.db): the collection, its embedding
model and size, the query set and the cut-off as params; every mode's scores as
metrics named `<mode>.<measure>` (`hybrid.recall_at_10`, `dense.ndcg_at_10`;
MLflow does not allow '@' in names); the JSON results file as an artifact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfhost.bench.tracking import DEFAULT_TRACKING_URI, TrackedRun, TrackingError, start_run

DEFAULT_EXPERIMENT = "selfhost-rag-eval"
RUN_KIND = "rag-eval"

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "metric_name", "eval_metrics", "start_eval_run"]


def metric_name(mode: str, measure: str) -> str:
    """'hybrid', 'recall@10' -> 'hybrid.recall_at_10'."""
    return f"{mode}." + re.sub(r"[^\w.\- /]", "_", measure.replace("@", "_at_"))


def eval_metrics(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {metric_name(mode, measure): value for mode, scores in results.items() for measure, value in scores.items()}


def start_eval_run(tracking_uri: str, experiment: str, params: Mapping[str, Any]) -> TrackedRun:
    """A RUNNING run named after the collection; opened before the evaluation so a bad store fails first."""
    try:
        import mlflow  # noqa: F401  (the rag extra does not bring it)
    except ImportError as err:
        raise TrackingError("--track needs MLflow: pip install 'selfhost[bench]'") from err
    return start_run(tracking_uri, experiment, f"rag-eval-{params['collection']}", params, kind=RUN_KIND)


def finish_eval_run(run: TrackedRun, results: Mapping[str, Mapping[str, float]], results_file: Path) -> None:
    run.close(eval_metrics(results), [results_file])
