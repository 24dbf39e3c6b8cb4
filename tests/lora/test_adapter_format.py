"""PEFT-written adapters on selfhost's model: the same logits as PEFT on transformers."""

import json

import pytest
import torch

from selfhost.lora.adapter_format import AdapterError, read_adapter
from selfhost.lora.apply import LoRALinear, apply_adapter, remove_adapters
from selfhost.models.loader import load_model
from tests.lora.conftest import make_peft_adapter, peft_logits, selfhost_logits

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "family, targets, config",
    [
        ("llama", ALL, {"r": 4, "lora_alpha": 8}),
        # q and v only: the fused qkv_proj is adapted in two of its three shards
        ("qwen2", ["q_proj", "v_proj", "up_proj"], {"r": 8, "lora_alpha": 16, "use_rslora": True}),
        ("mistral", ALL, {"r": 4, "lora_alpha": 8, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}),
        ("gemma", ALL, {"r": 4, "lora_alpha": 4}),
        # Phi-3's checkpoint fuses q/k/v and gate/up itself: PEFT adapts the fused modules whole
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {"r": 4, "lora_alpha": 8}),
    ],
)
def test_peft_adapter_matches_peft_on_transformers(tiny_checkpoint, tmp_path, prompt_ids, family, targets, config):
    model_dir = tiny_checkpoint(family)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "adapter", targets, **config)
    model = load_model(model_dir, torch.float32, CPU)
    base = selfhost_logits(model, prompt_ids)
    apply_adapter(model, read_adapter(adapter_dir))
    ours = selfhost_logits(model, prompt_ids)
    ref = peft_logits(model_dir, adapter_dir, prompt_ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    remove_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(selfhost_logits(model, prompt_ids), base, atol=0, rtol=0)


@pytest.fixture(scope="module")
def llama_adapter(tiny_checkpoint, tmp_path_factory):
    return make_peft_adapter(tiny_checkpoint("llama"), tmp_path_factory.mktemp("adapter"), ["q_proj", "down_proj"],
                             r=4, lora_alpha=8)


def test_adapter_for_another_base_is_refused(tiny_checkpoint, llama_adapter):
    model = load_model(tiny_checkpoint("llama-linear-rope"), torch.float32, CPU)  # head_dim 32: q_proj is wider
    with pytest.raises(AdapterError, match="made for another base model"):
        apply_adapter(model, read_adapter(llama_adapter))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half applied


def _edit_config(folder, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    raw = json.loads((copy / "adapter_config.json").read_text())
    raw.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(raw))
    return copy


def test_rank_that_does_not_fit_is_refused(llama_adapter, tmp_path):
    with pytest.raises(AdapterError, match="do not fit rank r=8"):
        read_adapter(_edit_config(llama_adapter, tmp_path, r=8))


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"), ("peft_type", "IA3")])
def test_unsupported_config_is_refused(llama_adapter, tmp_path, field, value):
    with pytest.raises(AdapterError, match=field if field != "peft_type" else "IA3"):
        read_adapter(_edit_config(llama_adapter, tmp_path, **{field: value}))


def test_unknown_target_module_is_refused(llama_adapter, tmp_path):
    with pytest.raises(AdapterError, match="unknown target module.*c_attn"):
        read_adapter(_edit_config(llama_adapter, tmp_path, target_modules=["q_proj", "c_attn"]))


def test_tensor_of_unknown_module_is_refused(llama_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _edit_config(llama_adapter, tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lm_head"):
        read_adapter(folder)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        read_adapter(tmp_path)


def test_a_second_adapter_is_refused_before_any_change(tiny_checkpoint, llama_adapter):
    model = load_model(tiny_checkpoint("llama"), torch.float32, CPU)
    apply_adapter(model, read_adapter(llama_adapter))
    before = [type(m) for m in model.modules()]
    with pytest.raises(AdapterError, match="already carries adapters"):
        apply_adapter(model, read_adapter(llama_adapter))
    assert [type(m) for m in model.modules()] == before


def test_pickle_weights_only_on_opt_in(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = make_peft_adapter(tiny_checkpoint("llama"), tmp_path / "st", ["q_proj", "down_proj"], r=4, lora_alpha=8)
    old = tmp_path / "bin"
    shutil.copytree(folder, old)
    torch.save(load_file(str(old / "adapter_model.safetensors")), old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.bin, a pickle"):
        read_adapter(old)
    expected, got = read_adapter(folder), read_adapter(old, allow_pickle=True)
    assert expected.modules.keys() == got.modules.keys()
    for key, m in expected.modules.items():
        assert torch.equal(m.lora_a, got.modules[key].lora_a) and torch.equal(m.lora_b, got.modules[key].lora_b)
    (old / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match="weights-only pickle"):
        read_adapter(old, allow_pickle=True)
