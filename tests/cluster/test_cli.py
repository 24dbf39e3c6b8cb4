"""`selfhost serve --ray` refuses bad input with one line and exit 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cluster.conftest import free_port


def _serve(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfhost.cli", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_ray_not_installed(tmp_path):
    blocked = tmp_path / "ray"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    line = _one_error_line(_serve("--ray", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}))
    assert "pip install 'selfhost[ray]'" in line


def test_unreachable_address():
    pytest.importorskip("ray")
    line = _one_error_line(_serve("--ray", "--address", f"ray://127.0.0.1:{free_port()}", timeout=60))
    assert "cannot reach Ray" in line


def test_more_replicas_than_cpus():
    pytest.importorskip("ray")
    replicas = (os.cpu_count() or 1) + 1
    line = _one_error_line(_serve("--ray", "--replicas", str(replicas)))
    assert f"--replicas {replicas}" in line and "CPUs" in line


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas applies only with --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1,2"], "not both"),
    (["--ray", "--autoscale", "2"], "MIN,MAX"),
    (["--ray", "--allow-load"], "--allow-load cannot be combined with --ray"),
])
def test_bad_flags(args, message):
    pytest.importorskip("ray")
    assert message in _one_error_line(_serve(*args, timeout=60))
