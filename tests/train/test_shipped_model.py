"""The demo model shipped in the package: present, small, loadable by both stacks, better than bigrams."""

import json

from selfhost.hub import EMBEDDED_MODEL_DIR, resolve_model
from tests.train.conftest import assert_matches_transformers

MAX_BYTES = 25 * 2**20


def test_shipped_model_is_the_default_and_fits_the_size_budget():
    assert resolve_model(None) == EMBEDDED_MODEL_DIR
    total = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MB"


def test_shipped_model_matches_transformers():
    assert_matches_transformers(EMBEDDED_MODEL_DIR, "HAMLET:\nTo be, or not to be, that is the question:")


def test_shipped_model_beats_the_bigram_baseline():
    metrics = json.loads((EMBEDDED_MODEL_DIR / "training.json").read_text())
    assert metrics["val_loss"] < metrics["baselines"]["bigram"]["val_loss"] - 0.3


def test_list_shows_the_embedded_model():
    import typer
    from typer.testing import CliRunner

    from selfhost.cli.train import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "selfhost/shakespeare (default)" in result.output
    metrics = json.loads((EMBEDDED_MODEL_DIR / "training.json").read_text())
    assert f"{metrics['val_loss']:.3f}" in result.output
