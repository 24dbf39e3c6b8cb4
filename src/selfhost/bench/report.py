"""Show and save a bench result: a rich table, the JSON result, per-request records."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from selfhost.bench.result import BenchResult, write_result
from selfhost.bench.runner import LevelRun
from selfhost.bench.stats import Distribution

RESULT_FILE = "result.json"
RECORDS_FILE = "requests.jsonl"


def _ms(dist: Distribution | None, field: str) -> str:
    return f"{getattr(dist, field) * 1000:.1f}" if dist else "-"


def _s(dist: Distribution | None, field: str) -> str:
    return f"{getattr(dist, field):.2f}" if dist else "-"


def result_table(result: BenchResult) -> Table:
    info = result.info
    where = info.url or "in-process engine"
    title = escape(f"{info.model} @ {where}") + ("  (interrupted)" if result.interrupted else "")
    table = Table(title=title, caption=_caption(result))
    for name in ("level", "ok/sent", "errors", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                 "TPOT p50 ms", "TPOT p99 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s", "max in flight"):
        table.add_column(name, justify="left" if name == "level" else "right")
    best = result.best
    for level in result.levels:
        errors = ", ".join(f"{kind} {n}" for kind, n in level.errors.items() if n) or "0"
        throughput = f"{level.output_tok_s:.1f}"
        table.add_row(
            level.label + ("" if level.completed else " (partial)"),
            f"{level.num_ok}/{level.num_requests}",
            errors,
            f"{level.request_s:.2f}",
            f"[bold]{throughput}[/]" if level is best else throughput,
            _ms(level.ttft_s, "p50"),
            _ms(level.ttft_s, "p99"),
            _ms(level.tpot_s, "p50"),
            _ms(level.tpot_s, "p99"),
            _ms(level.itl_s, "p99"),
            _s(level.e2e_s, "p50"),
            _s(level.e2e_s, "p99"),
            str(level.max_in_flight),
        )
    return table


def _caption(result: BenchResult) -> str:
    sources = {level.tokens_source for level in result.levels if level.tokens_source}
    parts = [f"workload: {result.workload.get('source')}, output {result.workload.get('output_tokens')}"]
    if sources - {"usage", "engine"}:  # the engine counts its own token ids: exact, like usage
        parts.append(f"token counts from: {', '.join(sorted(sources))} (server sent no usage)")
    return escape("; ".join(parts))


def failure_lines(runs: Sequence[LevelRun], most: int = 3) -> list[str]:
    """Why requests failed, level by level: the `most` common messages with their counts."""
    lines = []
    for run in runs:
        reasons = Counter(r.error_detail or r.error for r in run.records if not r.ok)
        if not reasons:
            continue
        lines.append(f"{run.level.label}: {sum(reasons.values())} of {len(run.records)} requests failed:")
        lines += [f"  {count} x {reason}" for reason, count in reasons.most_common(most)]
        if len(reasons) > most:
            lines.append(f"  and {len(reasons) - most} more (every request's reason is in {RECORDS_FILE})")
    return lines


def write_records(runs: Sequence[LevelRun], path: Path) -> Path:
    """One JSON line per request, tagged with its level, for later analysis."""
    with path.open("w", encoding="utf-8") as out:
        for run in runs:
            for record in sorted(run.records, key=lambda r: r.index):
                out.write(json.dumps({"level": run.level.label, **record.to_dict()}) + "\n")
    return path


def write_outputs(result: BenchResult, runs: Sequence[LevelRun], out_dir: Path) -> dict[str, Path]:
    """Write result.json, requests.jsonl and the plots; returns name -> path."""
    from selfhost.bench.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "result": write_result(result, out_dir / RESULT_FILE),
        "records": write_records(runs, out_dir / RECORDS_FILE),
    }
    files.update(write_plots(result, out_dir))
    return files
