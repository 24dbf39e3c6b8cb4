"""The `selfhost` entry point itself: options that apply before any command."""

import importlib.metadata
import subprocess
import sys

import selfhost
from selfhost.cli import main


def test_version_prints_the_installed_version_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "selfhost.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"selfhost {importlib.metadata.version('selfhost')}\n"


def test_version_falls_back_to_the_source_tree_when_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert main.package_version() == selfhost.__version__


def test_log_lines_stay_whole_when_stderr_is_not_a_terminal():
    code = (
        "import logging, selfhost.cli.main as m; m._configure_logging(); "
        "logging.getLogger('selfhost.test').info('x' * 200 + ' end')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.splitlines() == ["INFO " + "x" * 200 + " end"]
