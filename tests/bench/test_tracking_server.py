"""Against a real `mlflow server` on loopback (slow: it takes ~15 s to start)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from selfhost.cli.bench import register

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers share our new process group, stopped together below
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_run_params_metrics_and_plots_reach_the_server(fake, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    register(app)
    fake.state.reset(ttft_s=0.01, itl_s=0.002)
    args = ["bench", "--url", fake.url, "--model", "ok", "--concurrency", "1,2", "--requests", "4",
            "--output-tokens", "fixed:4", "--out", "out", "--tracking-uri", mlflow_server, "--experiment", "srv"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_id = json.loads((tmp_path / "out" / "result.json").read_text())["tracking"]["run_id"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "ok" and run.data.params["concurrency"] == "1,2"
    assert run.data.metrics["c2.num_ok"] == 4 and run.data.metrics["output_tok_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"result.json", "throughput.png", "latency.png"} <= artifacts
    listed = CliRunner().invoke(app, ["runs", "list", "--tracking-uri", mlflow_server, "--experiment", "srv"])
    assert run_id[:8] in listed.output
