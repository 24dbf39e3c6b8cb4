"""Bad inputs to the offline step: clear errors, and never a partial folder."""

import json
import os

import pytest

from selfhost.errors import InvalidParameterError
from selfhost.quant import checkpoint
from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
from tests.quant.int8_parity import assert_stored_int8_matches_on_the_fly


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_weights_config_and_tokenizer(tiny_checkpoint, tmp_path):
    out = tmp_path / "q"
    plan = quantize_checkpoint(tiny_checkpoint("llama"), out, QuantConfig(method="int4", head_method="int8"))
    assert plan["lm_head"] == plan["model.embed_tokens"] == "int8"
    assert plan["model.layers.2.mlp.down_proj"] == "int4"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "selfhost", "format_version": 1, "method": "int4", "group_size": None,
        "symmetric": False, "head_method": "int8", "skip_modules": [],
    }
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_leftovers(out))
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


def test_refuses_an_already_quantized_checkpoint(tiny_checkpoint, tmp_path):
    quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "q", QuantConfig(method="int8"))
    with pytest.raises(InvalidParameterError, match=r"already quantized \(int8\)"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", QuantConfig(method="int4"))
    assert _leftovers(tmp_path) == ["q"]


def test_group_size_not_dividing_leaves_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidParameterError, match="group size 48 does not divide the 64 input features"):
        quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "q", QuantConfig(method="int4", group_size=48))
    assert _leftovers(tmp_path) == []


def test_refuses_a_non_empty_output_folder(tiny_checkpoint, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidParameterError, match="already exists and is not empty"):
        quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "q", QuantConfig(method="int8"))
    assert _leftovers(tmp_path / "q") == ["keep.txt"]


def test_missing_parent_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidParameterError, match="does not exist"):
        quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "nope" / "q", QuantConfig(method="int8"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_unwritable_output_folder(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(InvalidParameterError, match="no write permission"):
        quantize_checkpoint(tiny_checkpoint("llama"), locked / "q", QuantConfig(method="int8"))
    assert _leftovers(locked) == []


def test_permission_denied_while_creating_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    # Simulates what an unprivileged user meets (the suite may run as root).
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", denied)
    with pytest.raises(InvalidParameterError, match="cannot write .*Permission denied"):
        quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "q", QuantConfig(method="int8"))
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_leaves_no_partial_files(tiny_checkpoint, tmp_path, monkeypatch):
    def disk_full(tensors, path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "q", QuantConfig(method="int8"))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_quantized_folder_of_latent_attention_and_stacked_experts(tmp_path, family):
    """A q_proj of its own (latent attention without a query bottleneck) and experts stored as one 3-D
    tensor (gpt-oss) quantize to a folder that loads and decodes as on-the-fly int8 does."""
    import torch
    import transformers

    from tests.tiny_models import save_tiny_tokenizer

    if family == "gpt_oss":
        from tests.models.test_gpt_oss import _reference_model

        model = _reference_model()
    else:
        from tests.models.test_deepseek import DEEPSEEK_CONFIGS
        from tests.tiny_models import COMMON

        config_cls, overrides = DEEPSEEK_CONFIGS[family]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            getattr(transformers, config_cls)(**{**COMMON, **overrides}), dtype=torch.float32)
    source = tmp_path / "model"
    model.save_pretrained(source, safe_serialization=True)
    save_tiny_tokenizer(source)
    quantize_checkpoint(source, tmp_path / "int8", QuantConfig(method="int8"))
    assert_stored_int8_matches_on_the_fly(tmp_path / "int8", source, max_tokens=16)
