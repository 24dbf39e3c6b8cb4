"""The config -> ModelSpec mapping switches on each family's quirks."""

import json

import pytest

from selfhost.errors import UnsupportedModelError
from selfhost.layers.rotary import rope_angles
from selfhost.models.families import spec_from_config


def spec_of(tiny_checkpoint, name):
    return spec_from_config(json.loads((tiny_checkpoint(name) / "config.json").read_text()))


def test_family_quirks_are_switched_on(tiny_checkpoint):
    assert spec_of(tiny_checkpoint, "mistral").layer_windows == (16, 16, 16)
    gemma2 = spec_of(tiny_checkpoint, "gemma2")
    assert gemma2.layer_windows == (16, None, 16, None)
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.attn_scale) == (50.0, 30.0, 24**-0.5)
    assert gemma2.sandwich_norms and gemma2.norm_weight_offset == 1.0 and gemma2.embed_scale == 64**0.5
    gemma3 = spec_of(tiny_checkpoint, "gemma3")
    assert gemma3.layer_windows == (16, None, 16, None) and gemma3.qk_norm
    # local and global layers use different rope bases
    assert {r.theta for r in gemma3.ropes} == {10_000.0, 1_000_000.0}
    assert spec_of(tiny_checkpoint, "qwen2").qkv_bias and not spec_of(tiny_checkpoint, "qwen2").o_bias
    assert spec_of(tiny_checkpoint, "qwen3").qk_norm and spec_of(tiny_checkpoint, "qwen3").head_dim == 32
    assert spec_of(tiny_checkpoint, "phi3").ropes[0].rope_type == "longrope"
    assert spec_of(tiny_checkpoint, "llama3-rope").ropes[0].rope_type == "llama3"
    assert spec_of(tiny_checkpoint, "llama3-rope").tie_embeddings
    assert spec_of(tiny_checkpoint, "gemma").num_kv_heads == 1


def test_hub_style_config_with_rope_scaling_is_read():
    # The older config.json layout most Hub checkpoints carry (rope_theta + rope_scaling).
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
    }
    spec = spec_from_config(cfg)
    rope = spec.ropes[0]
    assert (rope.rope_type, rope.theta, rope.factor, rope.original_max_position) == ("llama3", 500000.0, 32.0, 8192)
    assert spec.head_dim == 64 and spec.num_kv_heads == 8


def test_gemma3_local_base_frequency_from_hub_config():
    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 16,
    }
    spec = spec_from_config(cfg)
    assert spec.layer_windows == (512,) * 5 + (None,)
    local = spec.ropes[spec.layer_rope[0]]
    assert local.theta == 10000.0 and spec.ropes[spec.layer_rope[5]].theta == 1000000.0


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM.*Phi3ForCausalLM"):
        spec_from_config({"architectures": ["GPT2LMHeadModel"]})


def test_unknown_rope_type_is_a_clear_error():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_scaling": {"rope_type": "mystery", "factor": 2.0},
    }
    with pytest.raises(UnsupportedModelError, match="'mystery'"):
        rope_angles(spec_from_config(cfg).ropes[0], 4)
