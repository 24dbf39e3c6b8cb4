"""GGUF export read back with gguf.GGUFReader: every key and every tensor checked.

Tensors are compared with the source checkpoint's own tensors (read with
safetensors, not through selfhost's model), after undoing the llama q/k row
interleave, so a wrong split or permutation cannot cancel out.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.quant.gguf_export import export_gguf, interleave_rotary_rows
from selfhost.quant.gguf_vocab import _adds_space_prefix
from selfhost.tokenizer import Tokenizer
from tests.tiny_models import make_tiny_checkpoint

Q = gguf.GGMLQuantizationType
# max |error| allowed, as a fraction of the tensor's largest magnitude
TOLERANCE = {Q.F32: 1e-7, Q.F16: 1e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7}
LAYER_NAMES = {  # llama.cpp name -> Hugging Face name inside model.layers.N
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def _source_name(gguf_name):
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[rest]}"
    return GLOBAL_NAMES[gguf_name]


def _deinterleave(w, num_heads):
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(
    "family,arch,gguf_type",
    [("llama", "llama", "f16"), ("llama", "llama", "q8_0"), ("llama", "llama", "q4_0"),
     ("llama3-rope", "llama", "q8_0"), ("qwen2", "qwen2", "q8_0"), ("qwen3", "qwen3", "f16")],
)
def test_every_key_and_tensor_read_back(tiny_checkpoint, tmp_path, family, arch, gguf_type):
    src = tiny_checkpoint(family)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    types = export_gguf(src, out, gguf_type)
    reader = gguf.GGUFReader(str(out))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    tied = cfg.get("tie_word_embeddings", False)
    expected_keys = {
        "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.name",
        "general.file_type", "general.quantization_version",
        *(f"{arch}.{k}" for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                  "attention.head_count", "attention.head_count_kv", "attention.key_length",
                                  "attention.value_length", "attention.layer_norm_rms_epsilon", "vocab_size",
                                  "rope.dimension_count", "rope.freq_base")),
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
        "tokenizer.chat_template",
    }
    tok = Tokenizer(src)
    if tok.hf.unk_token_id is not None:
        expected_keys.add("tokenizer.ggml.unknown_token_id")
        assert _field(reader, "tokenizer.ggml.unknown_token_id") == tok.hf.unk_token_id
    assert set(reader.fields) == expected_keys
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "general.file_type") == {"f16": 1, "q8_0": 7, "q4_0": 2}[gguf_type]
    for key, value in {
        "context_length": cfg["max_position_embeddings"], "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"], "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"], "attention.head_count_kv": cfg["num_key_value_heads"],
        "attention.key_length": head_dim, "attention.value_length": head_dim, "vocab_size": cfg["vocab_size"],
        "rope.dimension_count": head_dim, "rope.freq_base": cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
    }.items():
        assert _field(reader, f"{arch}.{key}") == pytest.approx(value), key
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])

    vocab = tok.hf.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]"
    assert _field(reader, "tokenizer.ggml.token_type")[1] == gguf.TokenType.CONTROL  # <s>
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.hf.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.hf.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.chat_template") == tok.hf.chat_template
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"

    source = load_file(str(src / "model.safetensors"))
    names = {t.name for t in reader.tensors}
    expected = {n for n in (_gguf_name(s) for s in source) if n is not None}
    if family == "llama3-rope":
        expected.add("rope_freqs.weight")
    assert names == expected
    assert ("output.weight" in names) is not tied
    for t in reader.tensors:
        assert t.tensor_type == types[t.name]
        if t.name == "rope_freqs.weight":
            assert t.data.shape == (head_dim // 2,) and t.data.min() >= 1.0 and t.data.max() == pytest.approx(8.0)
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        ref = source[_source_name(t.name)].float().numpy()
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            data = _deinterleave(data, heads)
        assert data.shape == ref.shape, t.name
        expected_type = Q.F32 if ref.ndim == 1 else {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
        assert t.tensor_type == expected_type, t.name
        assert np.abs(data - ref).max() <= TOLERANCE[t.tensor_type] * np.abs(ref).max() + 1e-6, t.name


def _gguf_name(source_name):
    for g, s in GLOBAL_NAMES.items():
        if s == source_name:
            return g
    if source_name.startswith("model.layers."):
        _, _, layer, rest = source_name.split(".", 3)
        for g, s in LAYER_NAMES.items():
            if s == rest:
                return f"blk.{layer}.{g}"
    return None


def test_interleave_pairs_half_split_features():
    w = torch.arange(8).float().reshape(8, 1)  # 2 heads of head_dim 4: rows x0 x1 y0 y1 per head
    assert interleave_rotary_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert np.array_equal(_deinterleave(interleave_rotary_rows(w, 2).numpy(), 2), w.numpy())


# Gemma 2/3 and Phi-3: llama.cpp name (without "blk.N.") -> checkpoint name inside model.layers.N.
# Gemma's norms are stored as w and exported as 1 + w.
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_down": "mlp.down_proj"}
FAMILY_LAYER_NAMES = {
    "gemma": _ATTN | {"ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"},
    "gemma2": _ATTN | {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
                       "ffn_up": "mlp.up_proj"},
    # Phi-3 checkpoints hold the fused projections llama.cpp reads.
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
}
FAMILY_LAYER_NAMES["gemma3"] = FAMILY_LAYER_NAMES["gemma2"] | {"attn_q_norm": "self_attn.q_norm",
                                                               "attn_k_norm": "self_attn.k_norm"}
BASE_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length",
             "attention.layer_norm_rms_epsilon", "vocab_size", "rope.dimension_count", "rope.freq_base")
# keys beyond BASE_KEYS and the values they must hold, from the tiny configs
FAMILY_KEYS = {
    "gemma": {},
    "gemma2": {"attention.sliding_window": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"attention.sliding_window": 16, "rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
    "phi3": {"attention.sliding_window": 20, "rope.scaling.original_context_length": 128,
             "rope.scaling.attn_factor": (1 + np.log(512 / 128) / np.log(128)) ** 0.5},
}


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory):
    # llama.cpp fixes Gemma 3's pattern at five sliding layers per global one; the shared tiny config alternates.
    return make_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3-6"), num_hidden_layers=6,
                                sliding_window_pattern=6)


@pytest.mark.parametrize("family,gguf_type", [("gemma", "f16"), ("gemma2", "q8_0"), ("gemma3", "f16"),
                                              ("phi3", "q8_0")])
def test_gemma_and_phi3_keys_and_tensors_read_back(tiny_checkpoint, gemma3_checkpoint, tmp_path, family, gguf_type):
    src = gemma3_checkpoint if family == "gemma3" else tiny_checkpoint(family)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    types = export_gguf(src, out, gguf_type)
    reader = gguf.GGUFReader(str(out))

    assert _field(reader, "general.architecture") == family
    keys = {k.removeprefix(f"{family}.") for k in reader.fields if k.startswith(f"{family}.")}
    assert keys == set(BASE_KEYS) | set(FAMILY_KEYS[family])
    for key, value in FAMILY_KEYS[family].items():
        expected = gguf.RopeScalingType(value).value if key == "rope.scaling.type" else value
        assert _field(reader, f"{family}.{key}") == pytest.approx(expected), key
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert _field(reader, f"{family}.attention.key_length") == head_dim

    source = load_file(str(src / "model.safetensors"))
    norm_offset = 0.0 if family == "phi3" else 1.0
    # llama.cpp scales Gemma queries by 1/sqrt(head_dim); the checkpoint by 1/sqrt(query_pre_attn_scalar).
    q_scale = (head_dim / cfg.get("query_pre_attn_scalar", head_dim)) ** 0.5
    expected = {"token_embd.weight": source["model.embed_tokens.weight"],
                "output_norm.weight": source["model.norm.weight"] + norm_offset}
    if "lm_head.weight" in source:
        expected["output.weight"] = source["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for name, hf_name in FAMILY_LAYER_NAMES[family].items():
            tensor = source[f"model.layers.{i}.{hf_name}.weight"]
            if name.endswith("norm"):
                tensor = tensor + norm_offset
            if name == ("attn_q_norm" if family == "gemma3" else "attn_q"):  # folded where it survives q_norm
                tensor = tensor * q_scale
            expected[f"blk.{i}.{name}.weight"] = tensor
    if family == "phi3":
        rope = cfg["rope_parameters"]
        expected["rope_factors_long.weight"] = torch.tensor(rope["long_factor"])
        expected["rope_factors_short.weight"] = torch.tensor(rope["short_factor"])
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        assert t.tensor_type == types[t.name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        ref = expected[t.name].float().numpy()
        assert data.shape == ref.shape, t.name
        assert np.abs(data - ref).max() <= TOLERANCE[t.tensor_type] * np.abs(ref).max() + 1e-6, t.name


def test_unsupported_inputs_are_clear_and_leave_no_file(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidParameterError, match="'q5_k'"):
        export_gguf(tiny_checkpoint("llama"), tmp_path / "m.gguf", "q5_k")
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        export_gguf(tiny_checkpoint("mistral"), tmp_path / "m.gguf", "f16")
    with pytest.raises(UnsupportedModelError, match=r"sliding layers \[0, 2\] differ from llama.cpp's fixed gemma3"):
        export_gguf(tiny_checkpoint("gemma3"), tmp_path / "m.gguf", "f16")
    with pytest.raises(InvalidParameterError, match="missing or not writable"):
        export_gguf(tiny_checkpoint("llama"), tmp_path / "nope" / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family,changes,message", [
    ("gemma2", dict(attn_logit_softcapping=None), "without attn logit soft-capping"),
    ("gemma", dict(tie_word_embeddings=False), "untied output head"),
    ("gemma3", dict(num_hidden_layers=6, sliding_window_pattern=6, attn_logit_softcapping=20.0),
     "with attn logit soft-capping"),
])
def test_what_llama_cpp_cannot_express_is_refused(tmp_path, family, changes, message):
    src = make_tiny_checkpoint(family, tmp_path / "src", **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        export_gguf(src, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("tokenizer_json,prepends", [
    # Llama 2 / Mistral: the normalizer prepends "▁"
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                         {"type": "Replace", "content": "\u2581"}]}}, True),
    # Gemma: spaces become "▁", nothing is prepended
    ({"normalizer": {"type": "Replace", "content": "\u2581"}, "pre_tokenizer": {"type": "Split"}}, False),
    # newer files: a Metaspace pre-tokenizer says it
    ({"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "first"}}, True),
    ({"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}}, False),
])
def test_sentencepiece_space_prefix_follows_the_tokenizer(tokenizer_json, prepends):
    # llama.cpp's SentencePiece tokenizer prepends a space unless add_space_prefix says not to.
    assert _adds_space_prefix(tokenizer_json) is prepends


def byte_fallback_checkpoint(out_dir, prepend_space: bool):
    """A tiny Gemma with a SentencePiece-style tokenizer (BPE with byte fallback), written as
    Llama 2 (a "▁" prepended to the text) or Gemma (no prefix) would write it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import _CORPUS, make_tiny_model

    make_tiny_model("gemma", out_dir)
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    prefix = [normalizers.Prepend("\u2581")] if prepend_space else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prepend_space else []))
    specials = ["<pad>", "<s>", "</s>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([_CORPUS], trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", add_bos_token=True).save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("prepend_space", [True, False])
def test_byte_fallback_vocab_is_sentencepiece_with_the_right_space_prefix(tmp_path, prepend_space):
    src = byte_fallback_checkpoint(tmp_path / "src", prepend_space)
    export_gguf(src, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is prepend_space
