"""The process's one worker pool (src/selfhost/_cpu_pool.c): correct under concurrent callers, shared by every kernel."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "selfhost"
HARNESS = Path(__file__).resolve().parent / "c" / "pool_stress_main.c"
HAVE_COMPILER = shutil.which("gcc") is not None or shutil.which("cc") is not None
needs_pool = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: the kernels and their pool are not built")


@needs_pool
def test_pool_is_built_where_a_compiler_exists():
    import selfhost._cpu_pool  # noqa: F401  (fails if `pip install -e .` did not build it)


@needs_pool
def test_stress_from_several_python_threads_runs_every_chunk_once():
    from selfhost import _cpu_pool

    errors = []

    def hammer(seed):
        errors.append(_cpu_pool.stress(3000, 300, 3, seed))

    callers = [threading.Thread(target=hammer, args=(seed,)) for seed in range(1, 5)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert errors == [0, 0, 0, 0]


@needs_pool
def test_every_kernel_module_shares_the_one_pool():
    """Products in every kernel, each on 3 threads: the process gains 2 pool workers, not 2 per module."""
    code = """
import os, torch
from selfhost import _cpu_pool
from selfhost.layers import _gemm_cpu, _matvec_cpu
from selfhost.quant import _int8_cpu
tasks = lambda: len(os.listdir('/proc/self/task'))
torch.set_num_threads(1)
x, w, y = torch.randn(8, 64), torch.randn(512, 64), torch.empty(8, 512)
before = tasks()
if _matvec_cpu.available():
    _matvec_cpu.matvec(x.data_ptr(), w.data_ptr(), y.data_ptr(), 8, 512, 64, 3)
if _gemm_cpu.available():
    _gemm_cpu.gemm(x.data_ptr(), w.data_ptr(), y.data_ptr(), 8, 512, 64, 3)
q, s = torch.randint(-127, 127, (512, 64), dtype=torch.int8), torch.ones(512)
_int8_cpu.linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), 0, y.data_ptr(), 8, 512, 64, 3)
print(tasks() - before, _cpu_pool.num_workers())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    new_threads, workers = map(int, out.stdout.split())
    assert workers == 2
    assert new_threads == 2


def build_harness(tmp_path: Path, *flags: str) -> Path:
    binary = tmp_path / "pool_stress"
    subprocess.run(
        ["gcc", "-std=c11", "-O1", "-g", "-DSELFHOST_POOL_NO_PYTHON", f"-I{SOURCE}", *flags,
         str(SOURCE / "_cpu_pool.c"), str(HARNESS), "-o", str(binary), "-pthread"],
        check=True, capture_output=True, text=True,
    )
    return binary


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_stress_harness_in_plain_c(tmp_path):
    binary = build_harness(tmp_path)
    run = subprocess.run([str(binary), "4", "5000", "300", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrong chunk runs: 0" in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_stress_harness_under_thread_sanitizer(tmp_path):
    binary = build_harness(tmp_path, "-fsanitize=thread")
    run = subprocess.run([str(binary), "3", "3000", "200", "3"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr
