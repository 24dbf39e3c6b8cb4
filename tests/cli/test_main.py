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
