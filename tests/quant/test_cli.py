import json
import subprocess
import sys

import gguf
import pytest
import typer
from typer.testing import CliRunner

from selfhost.cli.quant import register
from tests.tiny_models import _CORPUS

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def test_quantize_with_report_then_perplexity_and_export(app, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    text = tmp_path / "text.txt"
    text.write_text(_CORPUS[:800])
    out = tmp_path / "q4"
    result = runner.invoke(app, ["quantize", str(src), "--method", "int4", "--group-size", "32", "-o", str(out),
                                 "--report", "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    for variant in ("fp32", "int8", "int4"):
        assert variant in result.output
    assert (out / "quantization_report.png").stat().st_size > 1000

    result = runner.invoke(app, ["perplexity", str(out), "--text", str(text), "--window", "64"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "window 64, stride 32" in result.output

    result = runner.invoke(app, ["export", "gguf", str(src), "--type", "q8_0", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "{src}", "--method", "int3", "-o", "{tmp}/q"], "quantization method 'int3' is unknown"),
        (["quantize", "{src}", "--method", "int4", "--group-size", "48", "-o", "{tmp}/q"], "group size 48 does not divide"),
        (["export", "gguf", "{src}", "--type", "q2", "-o", "{tmp}/m.gguf"], "GGUF type 'q2' is unknown"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(tiny_checkpoint, tmp_path, args, message):
    args = [a.format(src=tiny_checkpoint("llama"), tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "selfhost.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def _one_line_error(args):
    proc = subprocess.run([sys.executable, "-m", "selfhost.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_export_refuses_an_existing_file_unless_forced(app, tiny_checkpoint, tmp_path):
    src, out = tiny_checkpoint("llama"), tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")
    message = _one_line_error(["export", "gguf", src, "-o", out])
    assert f"{out} already exists; pass --force" in message
    assert out.read_bytes() == b"an earlier export"
    result = runner.invoke(app, ["export", "gguf", str(src), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_quantize_refuses_a_non_empty_folder_unless_forced(app, tiny_checkpoint, tmp_path):
    src, out = tiny_checkpoint("llama"), tmp_path / "q8"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = _one_line_error(["quantize", src, "--method", "int8", "-o", out])
    assert "already exists and is not empty" in message and "--force" in message
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, ["quantize", str(src), "--method", "int8", "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]  # the replaced folder is gone
    message = _one_line_error(["quantize", src, "--method", "int8", "-o", src, "--force"])
    assert "is the model being quantized" in message
