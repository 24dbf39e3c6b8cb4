"""Export a full-precision checkpoint as one GGUF file that llama.cpp and Ollama load.

Tensors come from our loaded CausalLM, so any checkpoint selfhost reads
exports the same way. Layout changes on the way out (gguf_arch.py says which
architecture needs which):
- fused qkv_proj and gate_up_proj are split back into llama.cpp's separate
  attn_q/attn_k/attn_v and ffn_gate/ffn_up tensors, except for Phi-3, whose
  llama.cpp graph reads them fused (attn_qkv; ffn_up holds gate then up);
- for the "llama" architecture, llama.cpp rotates adjacent pairs of q/k
  features (2i, 2i+1) where Hugging Face checkpoints pair i with i + d/2, so
  each head's q and k rows are interleaved to match;
- Gemma norms scale by (1 + w) and store w; llama.cpp multiplies by the
  stored tensor, so 1 is added to every norm weight;
- where llama.cpp scales queries differently from the checkpoint (Gemma 2/3
  with query_pre_attn_scalar != head_dim), the ratio is folded into the query
  projection, or into q_norm when one follows it;
- mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE) write the router as
  ffn_gate_inp, each of the experts' gate/up/down weights stacked into one 3-D
  tensor (ffn_gate_exps, ...: expert-major), and Qwen2-MoE's shared expert as
  ffn_*_shexp with its gate as ffn_gate_inp_shexp. Routers stay f32 at every
  --type, as llama.cpp's converter and llama-quantize keep them.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from selfhost.errors import InvalidParameterError
from selfhost.layers.moe import SparseMoE
from selfhost.layers.rotary import _base_inv_freq, _llama3_inv_freq
from selfhost.models.decoder import CausalLM
from selfhost.models.spec import ModelSpec
from selfhost.quant.gguf_arch import GGUFArch, check_supported, global_rope, sliding_window
from selfhost.quant.gguf_vocab import write_vocab

Q = gguf.GGMLQuantizationType
# --type -> (tensor type of 2-D weights, file type recorded in the header)
GGUF_TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


T = gguf.MODEL_TENSOR
# Kept f32 whatever the --type (what llama.cpp's converter does): the routers' logits pick the experts.
_ALWAYS_F32 = {gguf.TENSOR_NAMES[kind].rpartition(".")[2] for kind in (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)}


def _name(kind: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def interleave_rotary_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, y_1, ...]; works for weights and biases."""
    head_dim = w.shape[0] // num_heads
    rest = w.shape[1:]
    return w.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: CausalLM, arch: GGUFArch) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name -> fp32 tensor in llama.cpp's row layout (our (out, in) weights)."""
    spec = model.spec
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    norm = lambda m: m.weight.detach() + spec.norm_weight_offset  # noqa: E731  (Gemma's 1 + w)
    q_scale = spec.attn_scale / arch.attn_scale(spec)  # folded into the queries when llama.cpp scales differently
    out = {_name(T.TOKEN_EMBD): model.model.embed_tokens.weight, _name(T.OUTPUT_NORM): norm(model.model.norm)}
    if not spec.tie_embeddings or arch.output_required:
        out[_name(T.OUTPUT)] = model.lm_head.weight  # the embeddings themselves when tied
    out |= _rope_tensors(spec)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for suffix in ("weight", "bias"):
            qkv = getattr(attn.qkv_proj, suffix)
            if qkv is None:
                continue
            wq, wk, wv = qkv[:q], qkv[q : q + kv], qkv[q + kv :]
            if q_scale != 1.0 and attn.q_norm is None:
                wq = wq * q_scale
            if arch.interleave_qk:
                wq, wk = interleave_rotary_rows(wq, spec.num_heads), interleave_rotary_rows(wk, spec.num_kv_heads)
            if arch.fused_projections:
                out[_name(T.ATTN_QKV, i, suffix)] = torch.cat([wq, wk, wv])
            else:
                out |= {_name(T.ATTN_Q, i, suffix): wq, _name(T.ATTN_K, i, suffix): wk,
                        _name(T.ATTN_V, i, suffix): wv}
        out[_name(T.ATTN_OUT, i)] = attn.o_proj.weight
        if attn.o_proj.bias is not None:
            out[_name(T.ATTN_OUT, i, "bias")] = attn.o_proj.bias
        if attn.q_norm is not None:
            out[_name(T.ATTN_Q_NORM, i)] = norm(attn.q_norm) * q_scale
            out[_name(T.ATTN_K_NORM, i)] = norm(attn.k_norm)
        out[_name(T.ATTN_NORM, i)] = norm(layer.input_layernorm)
        if spec.sandwich_norms:  # Gemma 2/3: post_attention_layernorm normalises the attention output
            out[_name(T.ATTN_POST_NORM, i)] = norm(layer.post_attention_layernorm)
            out[_name(T.FFN_NORM, i)] = norm(layer.pre_feedforward_layernorm)
            out[_name(T.FFN_POST_NORM, i)] = norm(layer.post_feedforward_layernorm)
        else:
            out[_name(T.FFN_NORM, i)] = norm(layer.post_attention_layernorm)
        if isinstance(mlp, SparseMoE):
            out |= _expert_tensors(mlp, i)
            continue
        if arch.fused_projections:
            out[_name(T.FFN_UP, i)] = mlp.gate_up_proj.weight  # gate rows, then up rows
        else:
            out[_name(T.FFN_GATE, i)] = mlp.gate_up_proj.weight[:inter]
            out[_name(T.FFN_UP, i)] = mlp.gate_up_proj.weight[inter:]
        out[_name(T.FFN_DOWN, i)] = mlp.down_proj.weight
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def _expert_tensors(moe: SparseMoE, layer: int) -> dict[str, torch.Tensor]:
    """The router (num_experts, hidden), every expert's gate/up/down stacked expert-major, and the shared expert."""
    inter = moe.experts[0].down_proj.weight.shape[1]
    gate_up = torch.stack([expert.gate_up_proj.weight for expert in moe.experts])  # (E, 2 * inter, hidden)
    down = torch.stack([expert.down_proj.weight for expert in moe.experts])  # (E, hidden, inter)
    out = {
        _name(T.FFN_GATE_INP, layer): moe.gate.weight,  # (E, hidden)
        _name(T.FFN_GATE_EXP, layer): gate_up[:, :inter],  # (E, inter, hidden)
        _name(T.FFN_UP_EXP, layer): gate_up[:, inter:],
        _name(T.FFN_DOWN_EXP, layer): down,
    }
    if moe.shared_expert is not None:
        shared = moe.shared_expert
        shared_inter = shared.down_proj.weight.shape[1]
        out |= {
            _name(T.FFN_GATE_INP_SHEXP, layer): moe.shared_expert_gate.weight,  # (1, hidden), as checkpoints hold it
            _name(T.FFN_GATE_SHEXP, layer): shared.gate_up_proj.weight[:shared_inter],
            _name(T.FFN_UP_SHEXP, layer): shared.gate_up_proj.weight[shared_inter:],
            _name(T.FFN_DOWN_SHEXP, layer): shared.down_proj.weight,
        }
    return out


def _rope_tensors(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Per-frequency divisors llama.cpp applies: Llama 3.1 scaling as one tensor, Phi-3's longrope as two
    (llama.cpp picks the long factors when its context exceeds the original one)."""
    rope = global_rope(spec)
    if rope.rope_type == "llama3":
        return {_name(T.ROPE_FREQS): _base_inv_freq(rope) / _llama3_inv_freq(rope)}
    if rope.rope_type == "longrope":
        return {_name(T.ROPE_FACTORS_LONG): torch.tensor(rope.long_factor, dtype=torch.float32),
                _name(T.ROPE_FACTORS_SHORT): torch.tensor(rope.short_factor, dtype=torch.float32)}
    return {}


def _write_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, arch: GGUFArch, file_type: gguf.LlamaFileType,
                    name: str) -> None:
    rope = global_rope(spec)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(spec.max_position)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(rope.rotary_dim)
    writer.add_rope_freq_base(rope.theta)
    if rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    if rope.rope_type == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position)
        writer.add_rope_scaling_attn_factors(rope.attention_factor)
    window = sliding_window(spec)
    if window is not None:
        writer.add_sliding_window(window)
    if "attn" in arch.softcaps and spec.attn_softcap is not None:
        writer.add_attn_logit_softcapping(spec.attn_softcap)
    if "final" in arch.softcaps and spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)
    if arch.experts is not None:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.experts_per_token)
        if arch.experts.width_key:
            writer.add_expert_feed_forward_length(spec.expert_size)
        else:  # llama.cpp's "llama" reads the experts' width from feed_forward_length
            assert spec.expert_size == spec.intermediate_size, (spec.expert_size, spec.intermediate_size)
        if arch.experts.shared_expert:
            writer.add_expert_shared_feed_forward_length(spec.shared_expert_size)


def _encode(name: str, tensor: torch.Tensor, weight_type: Q) -> tuple[np.ndarray, Q]:
    """1-D tensors (norms, biases, rope_freqs) and routers stay f32; 2-D weights and 3-D expert stacks
    take the requested type, or f16 where a row does not fill whole quantization blocks."""
    data = tensor.numpy()
    if data.ndim == 1 or name.split(".")[-2] in _ALWAYS_F32:
        return data.astype(np.float32), Q.F32
    if weight_type == Q.F16:
        return data.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), Q.F16
    return gguf.quants.quantize(data, weight_type), weight_type


def check_output(out_path: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing file without permission, and never replace a folder."""
    if out_path.is_dir():
        raise InvalidParameterError(f"cannot write {out_path}: it is a folder; name the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise InvalidParameterError(f"{out_path} already exists; pass --force to replace it")


def export_gguf(model_dir: Path, out_path: Path, gguf_type: str, overwrite: bool = False) -> dict[str, Q]:
    """Write `model_dir` as a GGUF file of `gguf_type` (f16, q8_0, q4_0); returns each tensor's type.

    The file is written beside `out_path` under a temporary name and renamed
    into place, so a failed export leaves nothing behind. An existing file at
    `out_path` is replaced only with `overwrite` (and only once the new one is complete).
    """
    from selfhost.models.families import spec_from_config
    from selfhost.models.loader import load_model, read_config

    if gguf_type not in GGUF_TYPES:
        raise InvalidParameterError(f"GGUF type {gguf_type!r} is unknown; choose one of {', '.join(GGUF_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = read_config(model_dir)
    if "quantization_config" in cfg:
        raise InvalidParameterError(
            f"{model_dir} is a selfhost-quantized checkpoint; export its full-precision source instead"
        )
    check_supported(spec_from_config(cfg))  # before the weights load: a refusal costs nothing
    check_output(out_path, overwrite)
    parent = out_path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"cannot write {out_path}: folder {parent} is missing or not writable")
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    arch = check_supported(model.spec)
    weight_type, file_type = GGUF_TYPES[gguf_type]

    tmp_path = parent / f".{out_path.name}.{os.getpid()}.tmp"
    types = {}
    try:
        writer = gguf.GGUFWriter(str(tmp_path), arch.name)
        _write_metadata(writer, model.spec, arch, file_type, model_dir.resolve().name)
        write_vocab(writer, model_dir, model.spec.vocab_size)
        for name, tensor in gguf_tensors(model, arch).items():
            data, types[name] = _encode(name, tensor, weight_type)
            writer.add_tensor(name, data, raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return types
