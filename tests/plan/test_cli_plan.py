"""The commands end to end, through the real entry point, so errors print as one line."""

import subprocess
import sys

import pytest


def selfhost(*args):
    code = "import sys; from selfhost.cli.main import main; sys.argv = ['selfhost', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_models_filters():
    out = selfhost("models", "--family", "qwen2.5", "--max-params", "8B")
    assert out.returncode == 0, out.stderr
    assert "qwen2.5:7b" in out.stdout and "qwen2.5:14b" not in out.stdout


def test_fit_and_ranking():
    out = selfhost("fit", "llama3.1:8b", "--device", "rtx4090", "--monthly-users", "800M")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout and "700,000,000" in out.stdout
    ranked = selfhost("fit", "--device", "custom", "--mem", "16GB", "--bandwidth", "100GB/s", "--quant", "int4", "--top", "5")
    assert ranked.returncode == 0, ranked.stderr
    assert "int4" in ranked.stdout


def test_cost_writes_report(tmp_path):
    out = selfhost("cost", "llama3.1:8b", "--device", "rtx4090", "--volume", "1B", "--api", "gpt-4o",
                   "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "crossover" in out.stdout
    assert (tmp_path / "cost.png").stat().st_size > 0 and (tmp_path / "cost.html").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (("fit", "lama3.1:8b", "--device", "rtx4090"), "did you mean 'llama3.1:8b'"),
    (("fit", "llama3.1:8b", "--device", "rtx490"), "did you mean 'rtx4090'"),
    (("fit", "llama3.1:8b", "--device", "custom", "--mem", "16GB", "--bandwidth", "0GB/s"), "--bandwidth='0GB/s'"),
    (("fit", "llama3.1:8b", "--device", "custom", "--mem", "16GB"), "needs --mem"),
    (("fit", "llama3.1:8b", "--concurrency", "0"), "--concurrency must be > 0"),
    (("cost", "llama3.1:8b", "--volume", "-5M"), "--volume"),
    (("cost", "llama3.1:405b", "--device", "rtx4090", "--volume", "1B"), "usable"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    out = selfhost(*args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert message in out.stderr
