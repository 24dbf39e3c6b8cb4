"""`selfhost bench` against a live `selfhost serve` (the embedded demo model) on loopback.

One bench run (levels c1 and c4) is shared by the tests below. While it runs, a
thread scrapes the server's /metrics, so the load the bench claims can be
checked against what the server saw: requests running in its engine, tokens it
counted. Then `selfhost cost` reads the run's measured throughput.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from selfhost.bench.dist import parse_length_dist
from selfhost.bench.workload import synthetic_workload
from selfhost.cli.bench import register
from selfhost.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME
from selfhost.tokenizer import Tokenizer
from tests.live_server import free_port, wait_until_healthy

NUM_REQUESTS = 8
# Long enough outputs that each level spans many /metrics scrapes even when the engine is fast.
PROMPT_TOKENS, OUTPUT_TOKENS = "uniform:8-24", "fixed:96"
LEVELS = {"c1": 1, "c4": 4}


@pytest.fixture(scope="module")
def live_server():
    """`selfhost serve` as a subprocess, as an operator would start it; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfhost.cli", "serve", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, lambda: proc.stderr.read().decode())
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class Scrape:
    finished: float  # requests the server has finished (its e2e histogram's count)
    running: float  # sequences in the engine's running batch
    prompt_tokens: float  # counters since the server started
    generation_tokens: float


def scrape(url: str) -> Scrape:
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.labels.get("model") == EMBEDDED_MODEL_NAME:
                values[sample.name] = sample.value
    return Scrape(
        values.get("selfhost_request_duration_seconds_count", 0.0),
        values.get("selfhost_num_requests_running", 0.0),
        values.get("selfhost_prompt_tokens_total", 0.0),
        values.get("selfhost_generation_tokens_total", 0.0),
    )


class Sampler(threading.Thread):
    """Scrapes /metrics every `interval_s` until stopped."""

    def __init__(self, url: str, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.scrapes: list[Scrape] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.scrapes.append(scrape(self.url))
            except httpx.TransportError:  # a missed scrape is fine; a dead sampler thread is not
                pass
            self.stop.wait(self.interval_s)


@dataclass(frozen=True)
class BenchRun:
    result: dict
    records: list[dict]
    out: Path
    tracking_uri: str
    before: Scrape
    after: Scrape
    scrapes: list[Scrape]


@pytest.fixture(scope="module")
def bench_run(live_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-e2e")
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    app = typer.Typer()
    register(app)
    args = ["bench", "--url", live_server + "/v1", "--model", EMBEDDED_MODEL_NAME,
            "--concurrency", ",".join(str(c) for c in LEVELS.values()), "--requests", str(NUM_REQUESTS),
            "--prompt-tokens", PROMPT_TOKENS, "--output-tokens", OUTPUT_TOKENS, "--device", "test-cpu",
            "--tracking-uri", tracking_uri, "--out", str(tmp / "out")]
    before = scrape(live_server)
    sampler = Sampler(live_server)
    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns
    sampler.start()
    try:
        invoked = CliRunner().invoke(app, args)
    finally:
        sampler.stop.set()
        sampler.join()
        os.chdir(cwd)
    assert invoked.exit_code == 0, invoked.output + repr(invoked.exception)
    out = tmp / "out"
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    result = json.loads((out / "result.json").read_text())
    return BenchRun(result, records, out, tracking_uri, before, scrape(live_server), sampler.scrapes)


def test_token_counts_equal_the_servers_usage_and_the_tokenizer(bench_run):
    workload = synthetic_workload(NUM_REQUESTS, parse_length_dist(PROMPT_TOKENS), parse_length_dist(OUTPUT_TOKENS),
                                  seed=0, num_levels=len(LEVELS))
    tokenizer = Tokenizer(EMBEDDED_MODEL_DIR)
    level_index = {label: i for i, label in enumerate(LEVELS)}
    assert len(bench_run.records) == NUM_REQUESTS * len(LEVELS)
    for record in bench_run.records:
        assert record["error"] is None and record["tokens_source"] == "usage"
        request = workload.per_level[level_index[record["level"]]][record["index"]]
        # /v1/chat/completions applies the chat template before counting.
        assert record["prompt_tokens"] == len(tokenizer.encode_chat(request.chat_messages()))
        assert record["output_tokens"] == request.max_tokens  # ignore_eos: runs to max_tokens
        assert len(record["itl_s"]) == record["output_tokens"] - 1  # one streamed chunk per token
    # The server's own counters moved by exactly what the bench recorded.
    before, after = bench_run.before, bench_run.after
    assert after.prompt_tokens - before.prompt_tokens == sum(r["prompt_tokens"] for r in bench_run.records)
    assert after.generation_tokens - before.generation_tokens == sum(r["output_tokens"] for r in bench_run.records)
    for level in bench_run.result["levels"]:
        assert level["total_output_tokens"] == sum(r.max_tokens for r in workload.requests)


def test_each_level_keeps_its_concurrency_in_flight_on_the_server(bench_run):
    # Levels run one after the other, so the server's count of finished requests
    # says which level a scrape belongs to: c1 while fewer than N have finished.
    start = bench_run.before.finished
    for i, (label, concurrency) in enumerate(LEVELS.items()):
        lo, hi = start + i * NUM_REQUESTS, start + (i + 1) * NUM_REQUESTS
        running = [s.running for s in bench_run.scrapes if lo <= s.finished < hi]
        assert running, f"no /metrics scrape landed in level {label}"
        assert max(running) == concurrency, (label, sorted(running))
    for level in bench_run.result["levels"]:  # and the client's own timestamps agree
        assert level["max_in_flight"] == LEVELS[level["label"]]


def test_the_mlflow_run_holds_params_metrics_and_plots(bench_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=bench_run.tracking_uri)
    run = client.get_run(bench_run.result["tracking"]["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["mode"] == "http" and params["model"] == EMBEDDED_MODEL_NAME
    assert params["backend"] == "selfhost"  # detected from /v1/models
    assert params["concurrency"] == "1,4" and params["device"] == "test-cpu"
    assert params["workload"] == f"prompt={PROMPT_TOKENS} output={OUTPUT_TOKENS} n={NUM_REQUESTS} seed=0"
    metrics = run.data.metrics
    assert metrics["output_tok_s"] == pytest.approx(bench_run.result["output_tok_s"])
    assert metrics["c4.max_in_flight"] == 4 and metrics["c1.num_ok"] == NUM_REQUESTS
    assert metrics["c1.ttft_p50_s"] > 0 and metrics["c4.tpot_p50_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "requests.jsonl", "throughput.png", "latency.png"} <= artifacts
    assert (bench_run.out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_takes_the_measured_throughput(bench_run):
    measured = bench_run.result["output_tok_s"]
    done = subprocess.run(
        [sys.executable, "-m", "selfhost.cli", "cost", EMBEDDED_MODEL_NAME, "--volume", "100M", "--device", "rtx4090",
         "--bench-result", str(bench_run.out / "result.json")],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"measured ({bench_run.out / 'result.json'}); decode {measured:,.1f}" in done.stdout


def test_default_lengths_fit_the_demo_models_context(live_server, tmp_path):
    # The defaults (256 prompt + 128 reply tokens) overflow the demo model's 256-token window;
    # the bench reads the window from /v1/models and shrinks them, so every request succeeds.
    context = next(m["max_model_len"] for m in httpx.get(live_server + "/v1/models").json()["data"]
                   if m["id"] == EMBEDDED_MODEL_NAME)
    assert context == 256
    app = typer.Typer()
    register(app)
    invoked = CliRunner().invoke(app, ["bench", "--url", live_server + "/v1", "--model", EMBEDDED_MODEL_NAME,
                                       "--requests", "4", "--concurrency", "1,2", "--no-track",
                                       "--out", str(tmp_path / "out")])
    assert invoked.exit_code == 0, invoked.output + repr(invoked.exception)
    assert f"lengths fitted to the {context}-token context" in invoked.output
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [level["num_ok"] for level in result["levels"]] == [4, 4]
    workload = result["workload"]
    fitted = parse_length_dist(workload["prompt_tokens"]).upper + parse_length_dist(workload["output_tokens"]).upper
    assert fitted <= context // 2
