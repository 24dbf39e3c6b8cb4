"""GGUF export of mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE), read back with gguf.GGUFReader.

Expected tensors are built from the source checkpoint's own per-expert tensors (read with
safetensors, not through selfhost's model): each projection stacked expert-major into the
(num_experts, out, in) array llama.cpp's converter writes, so a swapped gate/up, a wrong expert
order or a transposed stack cannot pass. The slow test at the end runs the files in llama.cpp.
"""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from selfhost.errors import UnsupportedModelError
from selfhost.quant.gguf_export import export_gguf
from tests.models.test_moe import MOE_CONFIGS
from tests.quant.test_gguf import BASE_KEYS, TOLERANCE, _deinterleave, _field
from tests.tiny_models import COMMON, save_tiny_tokenizer

Q = gguf.GGMLQuantizationType
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
HF_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# What llama.cpp's graphs fix, so what the exported variant must be: every layer sparse (no
# mlp_only_layers), Qwen2-MoE's router weights not renormalised, Qwen3-MoE's renormalised.
GGUF_VARIANT = {"qwen2_moe": dict(mlp_only_layers=[], decoder_sparse_step=1, norm_topk_prob=False),
                "qwen3_moe": dict(norm_topk_prob=True)}
# checkpoint name of each expert projection, inside model.layers.N
EXPERTS = {"mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
           "qwen2_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}
EXPERTS["qwen3_moe"] = EXPERTS["qwen2_moe"]
ATTENTION = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def moe_config(family, **changes):
    config_cls, overrides = MOE_CONFIGS[family]
    return getattr(transformers, config_cls)(**{**COMMON, **overrides, **GGUF_VARIANT.get(family, {}), **changes})


def make_moe_checkpoint(family, out_dir, **changes):
    """A tiny random checkpoint as tests/models/test_moe.py builds it, in the variant llama.cpp can run."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(family, **changes), dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tiny_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    built = {}

    def build(family, **changes):
        key = (family, *sorted(changes.items()))
        if key not in built:
            built[key] = make_moe_checkpoint(family, tmp_path_factory.mktemp(family), **changes)
        return built[key]

    return build


def expected_tensors(family, src):
    """llama.cpp name -> the array its converter would write, from the checkpoint's own tensors."""
    cfg = json.loads((src / "config.json").read_text())
    source = {name: t.float().numpy() for name, t in load_file(str(src / "model.safetensors")).items()}
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    block, names = EXPERTS[family]
    out = {"token_embd.weight": source["model.embed_tokens.weight"], "output_norm.weight": source["model.norm.weight"],
           "output.weight": source.get("lm_head.weight", source["model.embed_tokens.weight"])}
    if ARCH[family] != "qwen2moe" and "lm_head.weight" not in source:
        del out["output.weight"]  # tied: llama.cpp reads token_embd (qwen2moe insists on an output tensor)
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        for gguf_name, hf_name in ATTENTION.items():
            for suffix in ("weight", "bias"):
                if f"{layer}.{hf_name}.{suffix}" in source:
                    out[f"blk.{i}.{gguf_name}.{suffix}"] = source[f"{layer}.{hf_name}.{suffix}"]
        out[f"blk.{i}.ffn_gate_inp.weight"] = source[f"{layer}.{block}.gate.weight"]
        for kind, hf_name in names.items():
            out[f"blk.{i}.ffn_{kind}_exps.weight"] = np.stack(
                [source[f"{layer}.{block}.experts.{e}.{hf_name}.weight"] for e in range(num_experts)])
        if f"{layer}.mlp.shared_expert_gate.weight" in source:
            out[f"blk.{i}.ffn_gate_inp_shexp.weight"] = source[f"{layer}.mlp.shared_expert_gate.weight"]
            for kind in ("gate", "up", "down"):
                out[f"blk.{i}.ffn_{kind}_shexp.weight"] = source[f"{layer}.mlp.shared_expert.{kind}_proj.weight"]
    return out


@pytest.mark.parametrize("family,gguf_type,changes", [
    ("mixtral", "f16", {}), ("mixtral", "q8_0", {}), ("qwen2_moe", "f16", {}), ("qwen2_moe", "q4_0", {}),
    ("qwen2_moe", "f16", {"tie_word_embeddings": True}), ("qwen3_moe", "q8_0", {}), ("qwen3_moe", "f16", {}),
])
def test_moe_keys_and_tensors_read_back(moe_checkpoint, tmp_path, family, gguf_type, changes):
    src = moe_checkpoint(family, **changes)
    cfg = json.loads((src / "config.json").read_text())
    types = export_gguf(src, tmp_path / "m.gguf", gguf_type)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = ARCH[family]
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    expert_size = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]

    assert _field(reader, "general.architecture") == arch
    moe_keys = {"expert_count": num_experts, "expert_used_count": cfg["num_experts_per_tok"]}
    if arch != "llama":  # Mixtral's experts are feed_forward_length wide
        moe_keys["expert_feed_forward_length"] = expert_size
    if arch == "qwen2moe":
        moe_keys["expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
    keys = {k.removeprefix(f"{arch}.") for k in reader.fields if k.startswith(f"{arch}.")}
    assert keys == set(BASE_KEYS) | set(moe_keys)
    for key, value in moe_keys.items():
        assert _field(reader, f"{arch}.{key}") == value, key
    assert _field(reader, f"{arch}.feed_forward_length") == cfg["intermediate_size"]
    assert _field(reader, f"{arch}.block_count") == cfg["num_hidden_layers"]

    expected = expected_tensors(family, src)
    assert {t.name for t in reader.tensors} == set(expected)
    hidden = cfg["hidden_size"]
    for t in reader.tensors:
        ne = [int(n) for n in t.shape]  # ggml order: the row length first
        if t.name.endswith(("gate_exps.weight", "up_exps.weight")):
            assert ne == [hidden, expert_size, num_experts], t.name
        elif t.name.endswith("down_exps.weight"):
            assert ne == [expert_size, hidden, num_experts], t.name
        elif t.name.endswith("ffn_gate_inp.weight"):
            assert ne == [hidden, num_experts], t.name
        elif t.name.endswith("ffn_gate_inp_shexp.weight"):
            assert ne == [hidden, 1], t.name  # llama.cpp reads it as {n_embd}

        ref = expected[t.name]
        if ref.ndim == 1 or "ffn_gate_inp" in t.name:  # routers stay f32, as llama.cpp's converter keeps them
            want = Q.F32
        elif gguf_type == "f16" or ref.shape[-1] % 32:  # rows that fill no whole block fall back to f16
            want = Q.F16
        else:
            want = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
        assert t.tensor_type == types[t.name] == want, t.name

        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(ne)))
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            data = _deinterleave(data, heads)
        assert data.shape == ref.shape, t.name
        assert np.abs(data - ref).max() <= TOLERANCE[t.tensor_type] * np.abs(ref).max() + 1e-6, t.name


def _config_only(tmp_path, config, architecture):
    """Refusals come from config.json alone, before any weight is read."""
    config.architectures = [architecture]
    config.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("config_cls,architecture,changes", [
    ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(n_routed_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32)),
    ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(n_routed_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32)),
    ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
])
def test_moe_architectures_without_a_gguf_mapping_are_refused(tmp_path, config_cls, architecture, changes):
    src = _config_only(tmp_path, getattr(transformers, config_cls)(**{**COMMON, **changes}), architecture)
    with pytest.raises(UnsupportedModelError, match=rf"GGUF export of {architecture} is not supported yet \(.+\); "
                                                    r"supported: .*MixtralForCausalLM"):
        export_gguf(src, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family,changes,message", [
    ("qwen2_moe", dict(mlp_only_layers=[1]), r"layers \[1\] have dense MLPs"),
    ("qwen2_moe", dict(decoder_sparse_step=2), r"layers \[0, 2\] have dense MLPs"),
    ("qwen2_moe", dict(norm_topk_prob=True), "qwen2moe never renormalises"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=0), "with no shared expert .* qwen2moe needs one"),
    ("qwen3_moe", dict(norm_topk_prob=False), "qwen3moe always renormalises"),
    ("mixtral", dict(sliding_window=16), "sliding-window"),
])
def test_what_llama_cpp_moe_graphs_cannot_run_is_refused(tmp_path, family, changes, message):
    src = _config_only(tmp_path, moe_config(family, **changes), HF_ARCH[family])
    with pytest.raises(UnsupportedModelError, match=message):
        export_gguf(src, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


TEXT = "To be, or not to be, that is the question"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(ARCH))
@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 0.005), ("q8_0", 0.04)])
def test_llama_cpp_runs_the_moe_gguf_like_selfhost(moe_checkpoint, tmp_path, family, gguf_type, tolerance):
    """Bounds as tests/quant/test_llama_cpp.py: logits against transformers' fp32 ones within a fraction
    of their range, and (f16) the greedy continuation identical to selfhost's. The prompt routes its
    tokens to all or nearly all experts of every layer. Measured with llama-cpp-python 0.3.36: f16
    within 0.04% of the range for all three, q8_0 0.7% (Mixtral), 0.9% (Qwen2-MoE), 2.8% (Qwen3-MoE)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.quant.llama_cpp_check import assert_llama_cpp_matches

    assert_llama_cpp_matches(llama_cpp, moe_checkpoint(family), TEXT, gguf_type, tolerance, tmp_path)
