"""Helpers for tests that start `selfhost serve` as a subprocess: a free port from the OS, and a wait
until the server answers /health (or a clear failure naming what the server printed)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, server_output: Callable[[], str], timeout_s: float = 120) -> None:
    """Return once `url`/health answers 200; raise if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"selfhost serve did not come up: {server_output()[-2000:]}")
        time.sleep(0.2)
