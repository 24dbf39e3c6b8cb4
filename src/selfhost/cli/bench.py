"""`selfhost bench` (load-test an OpenAI-compatible endpoint or the in-process
engine) and `selfhost runs list|compare` (read bench runs back from MLflow)."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from selfhost.bench.defaults import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS, choose_lengths
from selfhost.bench.dist import SYNTAX_HELP, parse_length_dist
from selfhost.bench.runner import Level, LevelRun, plan_levels
from selfhost.bench.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI
from selfhost.cli.console import make_console
from selfhost.errors import InvalidParameterError, SelfhostError

runs_app = typer.Typer(help="Read bench runs back from MLflow.", no_args_is_help=True)

TrackingUri = Annotated[str, typer.Option("--tracking-uri", help="MLflow store: sqlite:///file.db or http://host:5000.")]
Experiment = Annotated[str, typer.Option("--experiment", help="MLflow experiment holding bench runs.")]


class BenchFailedError(SelfhostError):
    """A run in which no request succeeded: nothing was measured."""


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidParameterError(f"{flag} {text!r} must be a comma-separated list of numbers, e.g. 1,4,16") from None
    if not values:
        raise InvalidParameterError(f"{flag} {text!r} names no value")
    return values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def bench(
    url: Annotated[str | None, typer.Option(help="API base of an OpenAI-compatible server, e.g. http://localhost:8000/v1.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name the server serves (the request's `model`).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SELFHOST_BENCH_API_KEY", help="Bearer token, if the endpoint needs one.")] = None,
    api: Annotated[str, typer.Option(help="chat (/v1/chat/completions) or completions (/v1/completions).")] = "chat",
    concurrency: Annotated[str | None, typer.Option(help="Requests in flight per level, e.g. 1,4,16,64 [default: 1,4,16,64]; with --request-rate, one value: the in-flight cap.")] = None,
    requests: Annotated[int, typer.Option(help="Requests sent at every level.")] = 64,
    prompt_tokens: Annotated[str | None, typer.Option(help=f"Prompt length DIST: {SYNTAX_HELP} [default: fixed:{DEFAULT_PROMPT_TOKENS}, shrunk to fit a smaller served context].")] = None,
    output_tokens: Annotated[str | None, typer.Option(help=f"Reply length DIST (sent as max_tokens) [default: fixed:{DEFAULT_OUTPUT_TOKENS}, shrunk like the prompt].")] = None,
    dataset: Annotated[Path | None, typer.Option(help="JSONL/JSON prompts (prompt, messages or ShareGPT conversations) instead of synthetic ones.")] = None,
    request_rate: Annotated[str | None, typer.Option(help="Poisson arrival rate(s) in requests/s, e.g. 2 or 1,2,4: one open-loop level per rate.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts, lengths and arrivals; same seed, same requests.")] = 0,
    warmup: Annotated[int, typer.Option(help="Unrecorded requests sent one by one before the first level, so one-time costs stay out of the figures.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds before one request counts as a timeout.")] = 300.0,
    tokenizer: Annotated[str | None, typer.Option(help="HF tokenizer (folder or Hub id) for exact prompt lengths and for counting when the server sends no usage.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature sent with every request.")] = 0.0,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos so replies run to max_tokens (turn off for hosted APIs that reject it).")] = True,
    backend: Annotated[str | None, typer.Option(help="Label: serving stack (auto-detected from /v1/models when possible).")] = None,
    quantization: Annotated[str | None, typer.Option(help="Label: quantization of the served model (e.g. bf16, int8, Q4_K_M).")] = None,
    device: Annotated[str | None, typer.Option(help="Label: hardware serving it (e.g. 1xH100, M2 Max).")] = None,
    offline: Annotated[str | None, typer.Option(help="Run the workload through the in-process engine with this model instead of a server.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for result.json, requests.jsonl and plots [default: bench-results/<model>-<time>].")] = None,
    tracking_uri: TrackingUri = DEFAULT_TRACKING_URI,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name [default: model and time].")] = None,
) -> None:
    """Measure latency and throughput of an OpenAI-compatible endpoint (or the in-process engine)."""
    from selfhost.bench.client import APIS, EndpointConfig
    from selfhost.bench.result import RunInfo

    if (url is None) == (offline is None):
        raise InvalidParameterError("give exactly one of --url (a server) or --offline MODEL (the in-process engine)")
    if url is not None and not model:
        raise InvalidParameterError("--model is required with --url: the name the server knows the model by")
    if api not in APIS:
        raise InvalidParameterError(f"--api {api!r} is not one of {sorted(APIS)}")
    if warmup < 0:
        raise InvalidParameterError(f"--warmup {warmup} must be >= 0")
    model_name = model or offline
    assert model_name is not None
    levels = plan_levels(_numbers(concurrency, int, "--concurrency"), _numbers(request_rate, float, "--request-rate"))
    for dist in (prompt_tokens, output_tokens):  # malformed lengths fail before a model loads
        if dist is not None:
            parse_length_dist(dist)
    counter = None
    if tokenizer is not None:
        from selfhost.bench.tokens import load_token_counter

        counter = load_token_counter(tokenizer)

    config = client = None
    if offline is not None:
        from selfhost.bench.offline import EngineClient, load_engine

        # Before tracking: a bad model leaves no dangling MLflow run.
        client = EngineClient(load_engine(offline), api, temperature, ignore_eos, timeout)
        context_tokens = client.engine.llm.max_model_len
        info = RunInfo("offline", model_name, api=api, backend=backend or "selfhost-offline",
                       quantization=quantization, device=device)
    else:
        config = EndpointConfig(url, model_name, api, api_key, timeout, temperature, ignore_eos)
        detected, context_tokens = asyncio.run(_probe_endpoint(config))  # also fails fast on a dead endpoint
        info = RunInfo("http", model_name, url, api, backend or detected, quantization, device)
    lengths = choose_lengths(prompt_tokens, output_tokens, context_tokens, model_name, dataset is not None)
    try:
        workload = _workload(dataset, requests, lengths.prompt, lengths.output, seed, counter, len(levels))
    except BaseException:
        if client is not None:
            client.engine.shutdown()
        raise

    started = datetime.now(timezone.utc)
    name = run_name or f"{_slug(model_name)}-{started.astimezone():%Y%m%d-%H%M%S}"
    tracked = None
    if track:
        from selfhost.bench.tracking import run_params, start_run

        # MLflow retries an unreachable server for minutes by default; fail fast instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        tracked = start_run(tracking_uri, experiment, name, run_params(info, workload, levels, timeout, warmup))

    runs: list[LevelRun] = []  # filled as requests finish, so Ctrl-C keeps them
    try:
        interrupted = _measure(config, client, counter, workload, levels, runs, seed, warmup, info, lengths.note)
        result = _finish(info, workload, warmup, runs, started, interrupted, tracked,
                         out or Path("bench-results") / name)
    except Exception:
        if tracked is not None:
            tracked.fail()
        raise
    finally:
        if client is not None:
            client.engine.shutdown()
    if interrupted:
        raise typer.Exit(130)
    if result.best is None:  # the MLflow run is closed FAILED too
        sent = sum(level.num_requests for level in result.levels)
        raise BenchFailedError(f"all {sent} requests failed, so nothing was measured (reasons above)")


def _measure(config, client, counter, workload, levels, runs: list[LevelRun], seed, warmup, info, note) -> bool:
    """Apply the load level by level (over HTTP, or to the in-process `client`); True if Ctrl-C cut it short."""
    from selfhost.bench.workload import warmup_request

    warm = warmup_request(workload.requests[0])

    console = make_console()
    if note:
        console.print(escape(note), style="yellow" if note.startswith("warning") else None)
    console.print(escape(f"bench {info.model} @ {info.url or 'in-process engine'}: {workload.describe()}, "
                         f"levels {', '.join(level.label for level in levels)}"))
    try:
        with _ProgressBar(console, len(levels) * len(workload.requests)) as (on_level, on_record):
            if client is not None:
                asyncio.run(_run(client, workload.per_level, levels, runs, seed, warm, warmup, on_level, on_record))
            else:
                asyncio.run(_run_http(config, counter, workload.per_level, levels, runs, seed, warm, warmup,
                                      on_level, on_record))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: writing what finished[/]")
        return True
    return False


def _workload(dataset, num_requests, prompt_tokens, output_tokens, seed, counter, num_levels):
    from selfhost.bench.workload import dataset_workload, synthetic_workload

    output_dist = parse_length_dist(output_tokens)
    if dataset is not None:
        return dataset_workload(dataset, num_requests, output_dist, seed, num_levels)
    prompt_dist = parse_length_dist(prompt_tokens)
    return synthetic_workload(num_requests, prompt_dist, output_dist, seed, counter, num_levels)


def _finish(info, workload, warmup, runs, started, interrupted, tracked, out_dir: Path):
    """Statistics, files, table, why requests failed, and the MLflow run closed: also after Ctrl-C."""
    from selfhost.bench.report import failure_lines, result_table, write_outputs
    from selfhost.bench.result import BenchResult
    from selfhost.bench.stats import level_stats

    result = BenchResult(
        info=info,
        workload={**workload.to_dict(), "warmup_requests": warmup},
        levels=tuple(level_stats(run) for run in runs),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        interrupted=interrupted,
        tracking=tracked.describe() if tracked else None,
    )
    files = write_outputs(result, runs, out_dir)
    console = make_console()
    console.print(result_table(result))
    for line in failure_lines(runs):
        console.print(escape(line), style="red", highlight=False)
    if tracked is not None:
        tracked.finish(result, files)
    where = f"; MLflow run {tracked.run_id} in {tracked.client.tracking_uri}" if tracked else ""
    console.print(escape(f"results in {out_dir}/{where}"))
    return result


async def _probe_endpoint(config) -> tuple[str | None, int | None]:
    """(backend, context window of the model) from /v1/models; raises EndpointError if the server is down."""
    from selfhost.bench.client import EndpointClient, detect_backend, served_context

    async with EndpointClient(config) as client:
        models = await client.list_models()
    return detect_backend(models), served_context(models, config.model)


async def _run(client, per_level, levels: list[Level], runs: list[LevelRun], seed, warm, warmup, on_level, on_record) -> None:
    """Warm up, then run the levels, through an EndpointClient or an EngineClient."""
    from selfhost.bench.runner import run_levels, warm_up

    await warm_up(client.send, warm, warmup)
    await run_levels(client.send, per_level, levels, runs, seed, on_level, on_record)


async def _run_http(config, counter, per_level, levels, runs, seed, warm, warmup, on_level, on_record) -> None:
    from selfhost.bench.client import EndpointClient

    async with EndpointClient(config, counter) as client:
        await _run(client, per_level, levels, runs, seed, warm, warmup, on_level, on_record)


class _ProgressBar:
    """A rich progress bar over all requests of all levels, as two callbacks."""

    def __init__(self, console: Console, total: int) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=console, transient=True,
        )
        self.task = self.bar.add_task("starting", total=total, errors=0)
        self.errors = 0

    def __enter__(self):
        self.bar.__enter__()

        def on_level(level: Level) -> None:
            self.bar.update(self.task, description=f"level {level.label}")

        def on_record(record) -> None:
            self.errors += 0 if record.ok else 1
            self.bar.update(self.task, advance=1, errors=self.errors)

        return on_level, on_record

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


@runs_app.command("list")
def runs_list(
    tracking_uri: TrackingUri = DEFAULT_TRACKING_URI,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    limit: Annotated[int, typer.Option(help="How many recent runs to show.")] = 20,
) -> None:
    """Recent bench runs, newest first."""
    from selfhost.bench.runs import recent_runs, runs_table

    console = make_console()
    found = recent_runs(tracking_uri, experiment, limit)
    if not found:
        console.print(f"no bench runs in experiment {experiment!r} at {tracking_uri}")
        return
    console.print(runs_table(found))


@runs_app.command("compare")
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids (or unique prefixes of 6+ characters).")],
    tracking_uri: TrackingUri = DEFAULT_TRACKING_URI,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Bench runs side by side: params, headline metrics, and every level."""
    from selfhost.bench.runs import compare_table, find_runs

    make_console().print(compare_table(find_runs(tracking_uri, experiment, run_ids)))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
    app.add_typer(runs_app, name="runs")
