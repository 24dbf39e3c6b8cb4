"""A peer that lives in a venv of its own (vLLM's CPU build, llama-cpp-python): made once, on first use.

A venv without the mark file is (re)installed, so an interrupted install is not taken for a
working one. Standard library only, like the rest of the driver side.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

INSTALLED_MARK = "selfhost-bench-installed"  # written last


def is_installed(venv: Path) -> bool:
    return (venv / INSTALLED_MARK).exists()


def peer_python(python: Path | None, option: str, venv: Path, install, failure: type[Exception]) -> Path:
    """The peer's Python: the one the user named with `option` (which must exist), else the one in
    `venv`, made by `install(venv)` on first use."""
    if python is not None:
        if not python.exists():
            raise failure(f"{option} {python} does not exist")
        return python
    if not is_installed(venv):
        install(venv)
    return venv / "bin" / "python"


def make_venv(venv: Path, installs: list[list[str]], what: str, failure: type[Exception], hint: str = "",
              env: dict[str, str] | None = None) -> None:
    """A new venv at `venv`, then each of `installs` run by its pip (argument lists after `pip`);
    raises `failure` with pip's last lines (and `hint`) when a step fails. `what` names the install
    in the progress lines and the mark file."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    print(f"{what}: creating {venv}; log: {log}", file=sys.stderr, flush=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    base_python = getattr(sys, "_base_executable", sys.executable)  # not selfhost's venv
    steps = [[base_python, "-m", "venv", str(venv)], *[pip + step for step in installs]]
    start = time.perf_counter()
    with log.open("w") as out:
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode != 0:
                tail = " | ".join(log.read_text().strip().splitlines()[-3:])
                raise failure(f"installing {what} failed ({tail}){'; ' + hint if hint else ''}; full log: {log}")
    (venv / INSTALLED_MARK).write_text(f"{what}\n")
    print(f"{what}: installed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
