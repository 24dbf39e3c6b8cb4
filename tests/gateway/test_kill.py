"""The ledger after `kill -9` mid-traffic: every request whose response completed is recorded, exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from selfhost.gateway.ledger import ledger_url

from tests.gateway.conftest import remote
from tests.live_server import free_port, wait_until_healthy


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_mid_traffic_loses_and_duplicates_nothing(backend, upstreams, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    config = tmp_path / "selfhost.toml"
    config.write_text(f'[gateway]\nledger = "{url}"\n' + remote("gpt", upstreams[0].url))
    port = free_port()
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "selfhost.cli", "serve", "--config", str(config), "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            completed = _traffic_until_killed(f"http://127.0.0.1:{port}", proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
    engine = create_engine(ledger_url(url))  # read back by another client, as after a restart
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(text("SELECT request_id FROM gateway_requests"))]
    engine.dispose()
    assert len(ids) == len(set(ids))
    assert set(completed) <= set(ids), f"{len(set(completed) - set(ids))} completed requests missing"
    assert len(ids) - len(completed) <= 8  # at most the requests in flight at the kill


def _traffic_until_killed(url: str, proc: subprocess.Popen, log) -> list[str]:
    """8 clients send requests until 50 have completed, then the server gets SIGKILL; the completed ids."""
    wait_until_healthy(url, proc, lambda: (log.seek(0), log.read())[1], timeout_s=60)
    completed: list[str] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(url + "/v1/chat/completions",
                                    json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 200:
                    completed.append(r.headers["x-selfhost-request-id"])

    workers = [threading.Thread(target=traffic) for _ in range(8)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while len(completed) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    stop.set()
    for worker in workers:
        worker.join(timeout=15)
    assert len(completed) >= 50, "the server answered too few requests before the kill"
    return completed
