"""`selfhost train` / `selfhost list` from the command line, and the errors users can cause."""

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from selfhost.cli.train import register
from selfhost.errors import InvalidParameterError
from selfhost.train.data import CorpusError
from selfhost.train.export import OutputExistsError

runner = CliRunner()
TINY = ["--size", "tiny", "--steps", "12", "--eval-every", "6", "--checkpoint-every", "6", "--no-progress"]


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return app


def invoke(cli, *args):
    return runner.invoke(cli, ["train", *map(str, args)])


def leftovers(folder):
    """Anything a failed run could have left: partial exports, checkpoints."""
    return sorted(p.name for p in folder.iterdir() if p.name != "corpus.txt")


def test_train_writes_a_model_and_removes_its_checkpoints(cli, corpus_file, tmp_path):
    out = tmp_path / "model"
    result = invoke(cli, corpus_file, "-o", out, *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "TRAINING.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "training.json",
    ]
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["steps"] == 12 and metrics["val_loss"] > 0
    assert set(metrics["baselines"]) == {"unigram", "bigram"}
    assert leftovers(tmp_path) == ["model"]  # checkpoints are gone after a successful export


def test_missing_corpus_file(cli, tmp_path):
    result = invoke(cli, tmp_path / "nope.txt", "-o", tmp_path / "model", *TINY)
    assert isinstance(result.exception, CorpusError)
    assert "nope.txt does not exist" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    result = invoke(cli, tmp_path / "empty.txt", "-o", tmp_path / "model", *TINY)
    assert isinstance(result.exception, CorpusError)
    assert "empty" in str(result.exception)
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


def test_config_too_big_for_memory(cli, corpus_file, tmp_path):
    result = invoke(cli, corpus_file, "-o", tmp_path / "model", "--size", "base", "--hidden-size", "65536",
                    "--layers", "64", "--heads", "64", "--kv-heads", "64")
    assert isinstance(result.exception, InvalidParameterError)
    assert "GiB" in str(result.exception) and "--batch-size" in str(result.exception)
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(cli, corpus_file, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(cli, corpus_file, "-o", out, *TINY)
    assert isinstance(result.exception, OutputExistsError)
    assert "--overwrite" in str(result.exception)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    result = invoke(cli, corpus_file, "-o", out, "--overwrite", *TINY)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == ["model"]


def test_failure_during_export_leaves_no_half_written_model(cli, corpus_file, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    result = invoke(cli, corpus_file, "-o", tmp_path / "model", *TINY)
    assert isinstance(result.exception, OSError)
    # No model folder and no staging folder; the checkpoints stay so the run can be resumed.
    assert leftovers(tmp_path) == ["model-checkpoints"]


def test_bad_flag_value_names_it(cli, corpus_file, tmp_path):
    result = invoke(cli, corpus_file, "-o", tmp_path / "m", "--size", "tiny", "--heads", "3")
    assert isinstance(result.exception, InvalidParameterError)
    assert "hidden_size=32" in str(result.exception) and "num_heads=3" in str(result.exception)


def test_resume_from_cli_matches_uninterrupted_run(cli, corpus_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = invoke(cli, corpus_file, "-o", tmp_path / "a", *TINY, "--checkpoint-dir", ckpt, "--keep-checkpoints")
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["train", "--resume", str(ckpt / "step-000006.pt"), "-o", str(tmp_path / "b"),
                                "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt2")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_user_error_is_one_line_and_exit_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "selfhost.cli", "train", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "missing.txt does not exist" in proc.stderr


def test_a_run_no_better_than_unigram_says_so(cli, corpus_file, tmp_path):
    out = tmp_path / "model"
    result = invoke(cli, corpus_file, "-o", out, "--size", "tiny", "--steps", "2", "--eval-every", "2",
                    "--lr", "1e-6", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["val_loss"] >= metrics["baselines"]["unigram"]["val_loss"]
    said = " ".join(result.stderr.split())  # the console wraps long lines
    assert "warning: the model's validation loss" in said and "not better than the unigram baseline" in said
    assert "too few steps (2 run" in said and "--lr 1e-06" in said and "too little data" in said
    report = (out / "TRAINING.md").read_text()
    assert "**Warning:** the model's validation loss" in report and "too little data" in report


def test_a_run_better_than_unigram_has_no_warning(cli, corpus_file, tmp_path):
    out = tmp_path / "model"
    result = invoke(cli, corpus_file, "-o", out, "--size", "tiny", "--steps", "40", "--lr", "1e-2",
                    "--eval-every", "40", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["val_loss"] < metrics["baselines"]["unigram"]["val_loss"]
    assert "warning:" not in result.stderr and "Warning" not in (out / "TRAINING.md").read_text()
