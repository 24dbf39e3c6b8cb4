"""Read the throughput a benchmark measured, for `selfhost cost --bench-result FILE`.

The file is a JSON object written by `selfhost bench` (or by hand):

    {
      "schema": "selfhost.bench.throughput/1",
      "model": "llama3.1:8b",            # alias, Hub id or folder: must be the model being costed
      "device": "rtx4090",               # informational
      "precision": "int4",               # informational
      "concurrency": 16,
      "output_tok_s": 512.3,             # generated tokens per second, all sequences
      "prompt_tok_s": 4800.0,            # optional: prompt tokens prefilled per second
      "measured_at": "2026-11-25T10:00:00Z"
    }

Only `schema` and `output_tok_s` are required. A full `selfhost bench` result
file (schema "selfhost.bench/1", see docs/BENCH.md) carries the same top-level
`output_tok_s` (and the model in `endpoint.model`) and is accepted as is.
`selfhost cost` refuses a result whose model is not the one it costs
(`measured_model_matches`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfhost.catalog import ModelSpec
from selfhost.catalog.models import find_model
from selfhost.errors import InvalidParameterError

SCHEMA = "selfhost.bench.throughput/1"
BENCH_SCHEMA = "selfhost.bench/1"  # the bench team's full result file


@dataclass(frozen=True)
class MeasuredThroughput:
    output_tok_s: float
    prompt_tok_s: float | None = None
    source: str = ""
    model: str | None = None  # the model the benchmark ran, as the file names it

    def __post_init__(self) -> None:
        if not self.output_tok_s > 0:
            raise InvalidParameterError(f"{self.source}: output_tok_s must be > 0, got {self.output_tok_s}")
        if self.prompt_tok_s is not None and not self.prompt_tok_s > 0:
            raise InvalidParameterError(f"{self.source}: prompt_tok_s must be > 0, got {self.prompt_tok_s}")


def read_bench_result(path: str | Path) -> MeasuredThroughput:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise InvalidParameterError(f"cannot read benchmark result {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise InvalidParameterError(f"benchmark result {path} is not JSON: {err.msg} at line {err.lineno}") from err
    if not isinstance(data, dict) or data.get("schema") not in (SCHEMA, BENCH_SCHEMA):
        raise InvalidParameterError(
            f"benchmark result {path} must be a JSON object whose 'schema' is {SCHEMA!r} or {BENCH_SCHEMA!r}"
        )
    try:
        output = float(data["output_tok_s"])
        prompt = float(data["prompt_tok_s"]) if data.get("prompt_tok_s") is not None else None
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidParameterError(f"benchmark result {path} needs a numeric output_tok_s") from err
    endpoint = data.get("endpoint") if isinstance(data.get("endpoint"), dict) else {}
    model = data.get("model") or endpoint.get("model")
    return MeasuredThroughput(output, prompt, source=str(path), model=str(model) if model else None)


def measured_model_matches(measured: str, model: ModelSpec) -> bool:
    """Does the model a benchmark names (alias, Hub id, folder or served name) denote `model`?"""
    name = measured.strip()
    names = {model.alias.lower(), *(repo.lower() for repo in model.hub_repos)}
    if name.lower() in names:
        return True
    entry = find_model(name)
    if entry is not None:
        return entry.alias == model.alias
    # A checkpoint folder or a served name: its last part against the repos' names.
    return Path(name).name.lower() in {Path(repo).name.lower() for repo in names}
