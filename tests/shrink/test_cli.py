"""`selfhost distill` and `selfhost prune` from the command line, and the errors users can cause."""

import json
import subprocess
import sys

import typer
from typer.testing import CliRunner

from selfhost.cli.shrink import register
from selfhost.errors import InvalidParameterError
from selfhost.tokenizer import TokenizerMismatchError

runner = CliRunner()
FAST = ["--steps", "4", "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2", "--context-len", "32",
        "--no-progress"]


def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def invoke(*args):
    return runner.invoke(cli_app(), [str(a) for a in args])


def test_distill_with_a_cached_teacher_writes_the_student_and_keeps_only_the_cache(teacher_dir, corpus_file,
                                                                                  tmp_path):
    out = tmp_path / "student"
    result = invoke("distill", teacher_dir, "-o", out, "--data", corpus_file, "--cache-teacher", "top-k=16", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student-teacher-cache"]
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["steps"] == 4 and metrics["distillation"]["cache_top_k"] == 16
    assert json.loads((out / "config.json").read_text())["vocab_size"] == json.loads(
        (teacher_dir / "config.json").read_text())["vocab_size"]


def test_distills_cli_defaults_are_the_objectives_defaults():
    import inspect

    from selfhost.cli.shrink import distill
    from selfhost.shrink.kd_loss import DistillConfig

    params = inspect.signature(distill).parameters
    assert (params["temperature"].default, params["alpha"].default) == (DistillConfig.temperature,
                                                                        DistillConfig.alpha)


def test_bad_cache_spec_and_foreign_student_config_fail_before_any_work(teacher_dir, corpus_file, tmp_path):
    result = invoke("distill", teacher_dir, "-o", tmp_path / "s", "--data", corpus_file, "--cache-teacher", "64", *FAST)
    assert isinstance(result.exception, InvalidParameterError) and "write it as top-k=64" in str(result.exception)
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                                 "intermediate_size": 64, "vocab_size": 1000}))
    result = invoke("distill", teacher_dir, "-o", tmp_path / "s", "--data", corpus_file, "--student-config", shape,
                    *FAST)
    assert isinstance(result.exception, TokenizerMismatchError) and "vocab_size 1000" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shape.json"]


def test_distill_from_a_pruned_copy_then_heal_through_prune(teacher_dir, corpus_file, tmp_path):
    pruned = tmp_path / "pruned"
    result = invoke("prune", teacher_dir, "-o", pruned, "--mlp-width", "0.5", "--data", corpus_file,
                    "--calibration-window", "32", "--heal-steps", "2", "--batch-size", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((pruned / "pruning.json").read_text())["intermediate_size"] == 48
    assert json.loads((pruned / "training.json").read_text())["steps"] == 2
    result = invoke("distill", teacher_dir, "-o", tmp_path / "student", "--from-pruned", pruned, "--data",
                    corpus_file, *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "student" / "config.json").read_text())["intermediate_size"] == 48


def test_prune_refuses_a_heal_without_text_and_a_too_short_calibration(teacher_dir, tmp_path):
    result = invoke("prune", teacher_dir, "-o", tmp_path / "p", "--drop-layers", "1", "--heal-steps", "5")
    assert isinstance(result.exception, InvalidParameterError) and "needs training text" in str(result.exception)
    short = tmp_path / "short.txt"
    short.write_text("HAMLET: to be.")
    result = invoke("prune", teacher_dir, "-o", tmp_path / "p", "--drop-layers", "1", "--calibration", short)
    assert isinstance(result.exception, InvalidParameterError) and "shorter than one window" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_the_real_cli_prints_one_line_and_exits_1(teacher_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "selfhost.cli", "prune", str(teacher_dir), "-o", str(tmp_path / "p"),
         "--drop-layers", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--drop-layers 3 would leave no layer" in proc.stderr
    assert list(tmp_path.iterdir()) == []
