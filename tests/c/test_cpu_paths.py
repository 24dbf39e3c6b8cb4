"""The C kernels against pure-Python references (check_kernels.py): on this CPU, and on the
CPUs .ci/cpu-paths emulates with qemu-user (aarch64 with and without dotprod, x86-64 with
AVX2 only, x86-64 without AVX)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import selfhost

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).resolve().parent / "check_kernels.py"
INSTALLED = Path(selfhost.__file__).resolve().parents[1]  # the folder holding the selfhost package
QEMU_TOOLS = ("qemu-aarch64", "qemu-x86_64", "aarch64-linux-gnu-gcc")


def installed_kernels_that_run_here() -> list[str]:
    from selfhost.layers import linear
    from selfhost.quant import int8

    runs = []
    if linear._matvec_cpu is not None and linear._matvec_cpu.available():
        runs.append("matvec")
    if int8.avx2_available():  # the int8 kernel says available() on AVX2 and on aarch64 alike
        runs.append("int8")
    return runs


@pytest.mark.skipif(not list(INSTALLED.joinpath("selfhost").rglob("_cpu_pool*.so")),
                    reason="the C kernels are not built (no C compiler at install)")
def test_installed_kernels_match_the_pure_python_references_on_this_cpu():
    run = subprocess.run([sys.executable, str(CHECK), str(INSTALLED), "--available",
                          ",".join(installed_kernels_that_run_here())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and "ok   cpu_pool" in run.stdout


@pytest.mark.slow  # ~1 minute; CI runs .ci/cpu-paths itself, before the test suite
@pytest.mark.skipif(not all(shutil.which(tool) for tool in QEMU_TOOLS),
                    reason="qemu-user and gcc-aarch64-linux-gnu are not installed (.ci/cpu-paths installs them)")
def test_every_cpu_path_under_qemu():
    run = subprocess.run([str(REPO / ".ci" / "cpu-paths")], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHON": sys.executable})
    if run.returncode == 0 and "cpu-paths: skipped" in run.stdout:  # the arm64 sysroot could not be downloaded
        pytest.skip(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "every kernel matches on every CPU checked" in run.stdout
