"""`selfhost serve` start-up failures: one line on stderr, exit 1, no traceback, and the
access log as one JSON line per request (the CLI is run as an operator runs it, in a subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx

from tests.live_server import free_port, wait_until_healthy

# Wide enough that rich would not wrap the one-line error; the assertions check there is one line.
ENV = {**os.environ, "COLUMNS": "400"}


def serve(*args: str, env: dict | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfhost.cli", "serve", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout_s)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), done.stderr
    assert not any("error" in line.lower() for line in lines[:-1]), done.stderr  # no uvicorn start-up failure


def test_missing_folder(tmp_path):
    done = serve(str(tmp_path / "missing"), "--port", "0")
    assert_one_line_error(done, "missing", "does not exist")


def test_hub_id_offline_and_not_cached(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    done = serve("Qwen/Qwen2.5-0.5B-Instruct", "--port", "0", env=env)
    assert_one_line_error(done, "Qwen/Qwen2.5-0.5B-Instruct")


def test_memory_budget_too_small():
    done = serve("--memory-budget", "1KiB", "--port", "0")
    assert_one_line_error(done, "memory budget", "selfhost/shakespeare")


def test_invalid_setting_names_the_flag():
    done = serve("--max-model-len", "3")
    assert_one_line_error(done, "--max-model-len", "3")


def test_busy_port_fails_before_loading_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--port", str(port), "--log-level", "info")
    assert_one_line_error(done, str(port), "already in use")
    assert "loading model" not in done.stderr and "selfhost serve on" not in done.stderr


def test_access_log_is_one_json_line_per_request(tmp_path):
    port = free_port()
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    long_id = "x" * 150  # a record far wider than 80 columns
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "selfhost.cli", "serve", "--port", str(port)],
                                stdout=out, stderr=err, env=ENV)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc, err_path.read_text)
            assert httpx.get(f"{url}/v1/models/{long_id}").status_code == 404
            done = httpx.post(url + "/v1/completions", json={"model": "selfhost/shakespeare", "prompt": "To be",
                                                            "max_tokens": 3})
            assert done.status_code == 200
            expected = {("GET", "/health"), ("GET", f"/v1/models/{long_id}"), ("POST", "/v1/completions")}
            deadline = time.monotonic() + 10  # each line is written once its response has gone out
            while not expected <= {(e["method"], e["path"]) for e in _entries(out_path)}:
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    entries = _entries(out_path)  # every stdout line is a JSON object: the access log and nothing else
    for entry in entries:
        assert {"time", "method", "path", "status", "duration_ms", "client"} <= entry.keys()
        stamp = entry["time"]
        assert stamp.endswith("Z") and time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    assert {(e["path"], e["status"]) for e in entries} >= {(f"/v1/models/{long_id}", 404), ("/v1/completions", 200)}
    assert "selfhost serve on" in err_path.read_text()  # the banner and logs stay on stderr


def _entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
