"""Model references: local folders, the Hub cache, and clear errors offline."""

import os
import shutil
import subprocess
import sys

import pytest

from selfhost.errors import ModelNotFoundError
from selfhost.hub import resolve_model


def run_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "selfhost.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_local_folder_is_used_as_is(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    assert resolve_model(str(folder)) == folder


def test_hub_id_offline_is_one_clear_line_and_nonzero_exit(tmp_path):
    result = run_cli("run", "someorg/not-cached-model", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "someorg/not-cached-model" in lines[0] and "local folder" in lines[0]
    assert "Traceback" not in result.stderr


def test_hub_id_served_from_local_cache_offline(tiny_checkpoint, tmp_path):
    # The standard Hugging Face cache layout, as any earlier download leaves it.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-llama"
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = run_cli(
        "run", "someorg/tiny-llama", "To be", "-n", "4", "--seed", "1",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be")


def test_bad_references(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor"):
        resolve_model("just some words")


def test_unsupported_architecture_exits_cleanly(tiny_checkpoint, tmp_path):
    import json

    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    result = run_cli("run", str(tmp_path / "m"), "hi")
    assert result.returncode == 1
    assert "not supported" in result.stderr and "LlamaForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr
