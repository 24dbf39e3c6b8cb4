"""`selfhost bench` and `selfhost runs` end to end: loopback server, MLflow in a temp folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from selfhost.bench.dist import parse_length_dist
from selfhost.cli.bench import register
from selfhost.errors import InvalidParameterError, SelfhostError

runner = CliRunner()


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so the default store sqlite:///mlflow.db lands there."""
    monkeypatch.chdir(tmp_path)
    import mlflow

    previous = mlflow.get_tracking_uri()
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def bench_args(url, *extra):
    return ["bench", "--url", url, "--model", "ok", "--concurrency", "1,3", "--requests", "6",
            "--prompt-tokens", "uniform:5-20", "--output-tokens", "fixed:5", "--out", "out", *extra]


def test_bench_writes_files_and_logs_an_mlflow_run(cli, fake, in_tmp):
    fake.state.reset(ttft_s=0.02, itl_s=0.005)
    result = runner.invoke(cli, bench_args(fake.url, "--device", "cpu-test", "--quantization", "bf16"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((in_tmp / "out" / "result.json").read_text())
    assert [level["label"] for level in data["levels"]] == ["c1", "c3"]
    assert all(level["num_ok"] == 6 for level in data["levels"])
    assert data["output_tok_s"] > 0 and data["endpoint"]["backend"] == "vllm"  # detected from /v1/models
    assert {p.name for p in (in_tmp / "out").iterdir()} == {"result.json", "requests.jsonl", "throughput.png", "latency.png"}
    assert (in_tmp / "mlflow.db").exists()

    import mlflow

    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    runs = mlflow.search_runs(experiment_names=["selfhost-bench"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == data["tracking"]["run_id"]
    assert run["status"] == "FINISHED"
    assert run["params.endpoint"] == fake.url and run["params.model"] == "ok"
    assert (run["params.backend"], run["params.device"], run["params.quantization"]) == ("vllm", "cpu-test", "bf16")
    assert run["params.concurrency"] == "1,3"
    assert run["params.workload"] == "prompt=uniform:5-20 output=fixed:5 n=6 seed=0"
    assert run["metrics.output_tok_s"] == pytest.approx(data["output_tok_s"])
    assert run["metrics.c3.num_ok"] == 6 and run["metrics.c1.ttft_p50_s"] >= 0.02
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
    assert artifacts == {"result.json", "requests.jsonl", "throughput.png", "latency.png"}

    # A second run, then list and compare both (by short prefix).
    assert runner.invoke(cli, bench_args(fake.url, "--output-tokens", "fixed:3", "--out", "out2")).exit_code == 0
    listed = runner.invoke(cli, ["runs", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and listed.output.count("FINISHED") == 2
    ids = mlflow.search_runs(experiment_names=["selfhost-bench"])["run_id"].tolist()
    compared = runner.invoke(cli, ["runs", "compare", ids[0][:8], ids[1]], env={"COLUMNS": "200"})
    assert compared.exit_code == 0, repr(compared.exception)
    assert "c3.output_tok_s" in compared.output and "output=fixed:3" in compared.output
    missing = runner.invoke(cli, ["runs", "compare", "ffffffffff"])
    assert isinstance(missing.exception, SelfhostError) and "ffffffffff" in str(missing.exception)


def test_warmup_requests_are_sent_first_and_not_recorded(cli, fake, in_tmp):
    fake.state.reset(ttft_s=0.0, itl_s=0.0)
    store = f"sqlite:///{in_tmp / 'mlflow.db'}"  # absolute: MLflow caches the engine of a relative sqlite URI
    result = runner.invoke(cli, bench_args(fake.url, "--warmup", "2", "--tracking-uri", store))
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((in_tmp / "out" / "result.json").read_text())
    assert [level["num_requests"] for level in data["levels"]] == [6, 6]
    assert len(fake.state.bodies) == 2 + 12 and data["workload"]["warmup_requests"] == 2
    first = fake.state.bodies[2]["messages"][0]["content"]  # level c1's request 0
    for warm in fake.state.bodies[:2]:  # same size, other order: no prefix-cache head start
        assert warm["messages"][0]["content"].split() == first.split()[::-1]
        assert warm["max_tokens"] == fake.state.bodies[2]["max_tokens"]
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=store).get_run(data["tracking"]["run_id"])
    assert run.data.params["warmup_requests"] == "2"


def test_failures_are_reported_not_raised(cli, fake, in_tmp):
    fake.state.reset(ttft_s=0.0, itl_s=0.0)
    args = ["bench", "--url", fake.url, "--model", "flaky", "--concurrency", "2", "--requests", "9",
            "--out", "o", "--no-track"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, repr(result.exception)
    (level,) = json.loads((in_tmp / "o" / "result.json").read_text())["levels"]
    assert level["errors"]["http"] == 3 and level["num_ok"] == 6
    assert not (in_tmp / "mlflow.db").exists()
    listed = runner.invoke(cli, ["runs", "list"])  # reading must not create a store
    assert isinstance(listed.exception, SelfhostError) and "mlflow.db" in str(listed.exception)
    assert not (in_tmp / "mlflow.db").exists()


@pytest.mark.parametrize(
    "args, needle",
    [(["--model", "m"], "exactly one of"),
     (["--url", "http://x/v1"], "--model is required"),
     (["--url", "http://x/v1", "--model", "m", "--concurrency", "1,a"], "1,a"),
     (["--url", "http://x/v1", "--model", "m", "--prompt-tokens", "zipf:2"], "zipf:2"),
     (["--url", "http://x/v1", "--model", "m", "--api", "embeddings"], "embeddings"),
     (["--url", "http://x/v1", "--model", "m", "--warmup", "-1"], "--warmup -1")],
)
def test_user_errors_are_selfhost_errors(cli, args, needle):
    result = runner.invoke(cli, ["bench", *args, "--no-track"])
    assert isinstance(result.exception, SelfhostError), repr(result.exception)
    assert needle in str(result.exception)


def test_unreachable_endpoint_is_a_user_error(cli, in_tmp):
    result = runner.invoke(cli, ["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--no-track"])
    assert isinstance(result.exception, SelfhostError) and "127.0.0.1:9" in str(result.exception)


# Ctrl-C as a terminal delivers it: to a process whose SIGINT is Python's default handler. A shell
# runs background jobs (`pytest ... &`, CI wrappers) with SIGINT ignored and children inherit that,
# so the child restores the handler first; otherwise the SIGINT below would never reach it.
CLI_SCRIPT = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "import typer; from selfhost.cli.bench import register; app = typer.Typer(); register(app); app()")


def test_ctrl_c_still_writes_what_it_has(fake, tmp_path):
    # The server answers 6 requests and holds every later one, so whatever the machine's
    # speed or load, SIGINT arrives mid-level: 6 finished, 2 in flight, 392 never sent.
    fake.state.reset(ttft_s=0.0, itl_s=0.0, hold_after=6)
    out = tmp_path / "out"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["bench", "--url", fake.url, "--model", "ok", "--concurrency", "2", "--requests", "400",
            "--output-tokens", "fixed:5", "--warmup", "0", "--out", str(out), "--tracking-uri", store]
    proc = subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(fake.state.bodies) < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fake.state.bodies) == 8, f"{len(fake.state.bodies)} requests arrived, exit {proc.poll()}"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    data = json.loads((out / "result.json").read_text())
    assert data["interrupted"] is True
    (level,) = data["levels"]
    assert level["completed"] is False and level["num_ok"] == 6  # the answered ones; the held two were cut
    assert (out / "requests.jsonl").read_text().count("\n") == level["num_requests"]
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=store).get_run(data["tracking"]["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["interrupted"] == "true"
