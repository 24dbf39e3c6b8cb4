"""One function per architecture: a Hugging Face config.json dict -> ModelSpec.

Also how each family's checkpoint tensors map onto our module names: separate
q/k/v and gate/up weights are packed into one matmul at load time, so the
loader is a single generic loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from selfhost.errors import UnsupportedModelError
from selfhost.layers.rotary import RopeSpec
from selfhost.models.spec import ModelSpec

# checkpoint name -> (our fused module, shard index within it)
PACKED_WEIGHTS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

_ACTIVATION_NAMES = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}

_DEFAULT_THETA = 10_000.0


def _rope_params(cfg: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """Rope settings for one layer type, from either config.json format.

    Newer transformers write `rope_parameters` (flat, or nested by layer type);
    checkpoints on the Hub mostly carry `rope_theta` + `rope_scaling`.
    """
    params = cfg.get("rope_parameters")
    if params and layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    elif params and ("rope_type" in params or "rope_theta" in params or "type" in params):
        params = dict(params)
    else:
        params = dict(cfg.get("rope_scaling") or {})
        if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
            # Gemma 3: local layers use their own base and never the scaling.
            params = {"rope_theta": cfg["rope_local_base_freq"]}
        params.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA))
    params.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if "partial_rotary_factor" not in params and cfg.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    return params


def _rope_spec(cfg: dict[str, Any], layer_type: str, head_dim: int) -> RopeSpec:
    p = _rope_params(cfg, layer_type)
    rope_type = p["rope_type"]
    rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    max_position = cfg.get("max_position_embeddings", 2048)
    original = cfg.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
    common = dict(theta=float(p["rope_theta"]), rotary_dim=rotary_dim, rope_type=rope_type)
    if rope_type == "default":
        return RopeSpec(**common)
    if rope_type == "linear":
        return RopeSpec(**common, factor=float(p["factor"]))
    if rope_type == "llama3":
        return RopeSpec(
            **common,
            factor=float(p["factor"]),
            low_freq_factor=float(p["low_freq_factor"]),
            high_freq_factor=float(p["high_freq_factor"]),
            original_max_position=int(original or max_position),
        )
    if rope_type == "longrope":
        original = int(original or max_position)
        factor = p.get("factor") or max_position / original
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeSpec(
            **common,
            original_max_position=original,
            short_factor=tuple(p["short_factor"]),
            long_factor=tuple(p["long_factor"]),
            attention_factor=float(attention_factor),
        )
    if rope_type == "yarn":
        original = int(p.get("original_max_position_embeddings") or original or max_position)
        factor = float(p.get("factor") or max_position / original)
        return RopeSpec(
            **common,
            factor=factor,
            original_max_position=original,
            beta_fast=float(p.get("beta_fast") or 32),
            beta_slow=float(p.get("beta_slow") or 1),
            truncate=p.get("truncate", True),
            attention_factor=_yarn_attention_factor(p, factor),
        )
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3, longrope, yarn"
    )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(p: dict[str, Any], factor: float) -> float:
    """How much YaRN scales cos/sin: given, or the ratio of the two mscales DeepSeek configs carry."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    if p.get("mscale") and p.get("mscale_all_dim"):
        return _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
    return _yarn_mscale(factor)


def _base(cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Fields every family reads the same way."""
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    fields = dict(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=_ACTIVATION_NAMES.get(cfg.get("hidden_act", "silu"), cfg.get("hidden_act", "silu")),
        max_position=cfg.get("max_position_embeddings", 2048),
        attn_scale=head_dim**-0.5,
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )
    fields.update(overrides)
    return fields


def _layer_layout(cfg: dict[str, Any], head_dim: int, layer_types: list[str], window: int | None) -> dict[str, Any]:
    """Per-layer sliding windows and rope tables from a list of layer types."""
    distinct = sorted(set(layer_types))
    ropes = tuple(_rope_spec(cfg, t, head_dim) for t in distinct)
    return dict(
        layer_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        layer_rope=tuple(distinct.index(t) for t in layer_types),
        ropes=ropes,
    )


def _uniform_layers(cfg: dict[str, Any], fields: dict[str, Any], window: int | None) -> dict[str, Any]:
    layer_types = ["sliding_attention" if window else "full_attention"] * fields["num_layers"]
    return _layer_layout(cfg, fields["head_dim"], layer_types, window)


def llama(cfg: dict[str, Any]) -> ModelSpec:
    bias = cfg.get("attention_bias", False)
    fields = _base(cfg, qkv_bias=bias, o_bias=bias, mlp_bias=cfg.get("mlp_bias", False))
    return ModelSpec(**fields, **_uniform_layers(cfg, fields, None))


def mistral(cfg: dict[str, Any]) -> ModelSpec:
    fields = _base(cfg)
    return ModelSpec(**fields, **_uniform_layers(cfg, fields, cfg.get("sliding_window")))


def _qwen_layer_types(cfg: dict[str, Any]) -> tuple[list[str], int | None]:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 0) else "full_attention"
        for i in range(cfg["num_hidden_layers"])
    ]
    return layer_types, window


def qwen2(cfg: dict[str, Any]) -> ModelSpec:
    fields = _base(cfg, qkv_bias=True)
    layer_types, window = _qwen_layer_types(cfg)
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, window))


def qwen3(cfg: dict[str, Any]) -> ModelSpec:
    bias = cfg.get("attention_bias", False)
    fields = _base(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True)
    layer_types, window = _qwen_layer_types(cfg)
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, window))


def phi3(cfg: dict[str, Any]) -> ModelSpec:
    fields = _base(cfg)
    return ModelSpec(**fields, **_uniform_layers(cfg, fields, cfg.get("sliding_window")))


def _gemma_fields(cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    bias = cfg.get("attention_bias", False)
    # Gemma checkpoints say "gelu" for historical reasons but were trained with the tanh approximation.
    return _base(
        cfg,
        activation="gelu_tanh",
        norm_weight_offset=1.0,
        embed_scale=cfg["hidden_size"] ** 0.5,
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        qkv_bias=bias,
        o_bias=bias,
        **overrides,
    )


def gemma(cfg: dict[str, Any]) -> ModelSpec:
    fields = _gemma_fields(cfg)
    return ModelSpec(**fields, **_uniform_layers(cfg, fields, None))


def gemma2(cfg: dict[str, Any]) -> ModelSpec:
    fields = _gemma_fields(
        cfg,
        attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5,
        sandwich_norms=True,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
    )
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])
    ]
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, cfg.get("sliding_window")))


def gemma3(cfg: dict[str, Any]) -> ModelSpec:
    fields = _gemma_fields(
        cfg,
        attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5,
        sandwich_norms=True,
        qk_norm=True,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
    )
    pattern = cfg.get("sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg["num_hidden_layers"])
    ]
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, cfg.get("sliding_window")))


def _moe_fields(cfg: dict[str, Any], expert_size: int, normalize_top_k: bool,
                shared_expert_size: int = 0) -> dict[str, Any]:
    """Which layers are sparse: all, or every `decoder_sparse_step`-th except `mlp_only_layers` (Qwen)."""
    step, dense = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or [])
    moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(cfg["num_hidden_layers"]))
    # Hub configs say num_experts (Qwen) or num_local_experts (Mixtral; transformers 5 writes it for Qwen too).
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    return dict(num_experts=num_experts, experts_per_token=cfg["num_experts_per_tok"], expert_size=expert_size,
                normalize_top_k=normalize_top_k, shared_expert_size=shared_expert_size, moe_layers=moe_layers)


def mixtral(cfg: dict[str, Any]) -> ModelSpec:
    # Every Mixtral layer is sparse; each expert is intermediate_size wide; the top-k weights are renormalised.
    fields = _base(cfg, **_moe_fields(cfg, cfg["intermediate_size"], True))
    return ModelSpec(**fields, **_uniform_layers(cfg, fields, cfg.get("sliding_window")))


def qwen2_moe(cfg: dict[str, Any]) -> ModelSpec:
    fields = _base(cfg, qkv_bias=True, **_moe_fields(
        cfg, cfg["moe_intermediate_size"], cfg.get("norm_topk_prob", False), cfg.get("shared_expert_intermediate_size", 0)))
    layer_types, window = _qwen_layer_types(cfg)
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, window))


def qwen3_moe(cfg: dict[str, Any]) -> ModelSpec:
    bias = cfg.get("attention_bias", False)
    fields = _base(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True, **_moe_fields(
        cfg, cfg["moe_intermediate_size"], cfg.get("norm_topk_prob", False)))
    layer_types, window = _qwen_layer_types(cfg)
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, window))


def _deepseek(cfg: dict[str, Any], routing: str, normalize_top_k: bool, scaling: float) -> ModelSpec:
    """DeepSeek V2/V3: latent attention everywhere; dense MLPs in the first `first_k_dense_replace`
    layers, then routed experts plus ungated shared experts (n_shared_experts of them, run as one MLP)."""
    nope, rope_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    num_layers, first_dense = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace") or 0
    step = cfg.get("moe_layer_freq") or 1
    rope = _rope_spec(cfg, "full_attention", rope_dim)
    # YaRN's mscale_all_dim sharpens the softmax of every dim, not only the rotated ones.
    scale = (nope + rope_dim) ** -0.5
    params = _rope_params(cfg, "full_attention")
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    fields = _base(
        cfg,
        num_kv_heads=cfg["num_attention_heads"],
        head_dim=nope + rope_dim,
        attn_scale=scale,
        o_bias=cfg.get("attention_bias", False),
        num_experts=cfg["n_routed_experts"],
        experts_per_token=cfg["num_experts_per_tok"],
        expert_size=cfg["moe_intermediate_size"],
        normalize_top_k=normalize_top_k,
        shared_expert_size=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        shared_expert_gated=False,
        moe_layers=tuple(i >= first_dense and i % step == 0 for i in range(num_layers)),
        routing=routing,
        num_expert_groups=cfg.get("n_group") or 1,
        top_k_expert_groups=cfg.get("topk_group") or 1,
        routed_scaling_factor=scaling,
        kv_lora_rank=cfg["kv_lora_rank"],
        q_lora_rank=cfg.get("q_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=cfg["v_head_dim"],
    )
    return ModelSpec(**fields, layer_windows=(None,) * num_layers, layer_rope=(0,) * num_layers, ropes=(rope,),
                     rope_interleave=cfg.get("rope_interleave", True))


def deepseek_v2(cfg: dict[str, Any]) -> ModelSpec:
    # DeepSeek's own V2 code either renormalises the top-k weights or scales them by
    # routed_scaling_factor, never both (transformers' port does not renormalise: every released
    # V2 config has norm_topk_prob false, where the two agree). Rope pairs are always interleaved.
    routing = "group_limited_greedy" if cfg.get("topk_method") == "group_limited_greedy" else "softmax_top_k"
    normalize = bool(cfg.get("norm_topk_prob")) and cfg["num_experts_per_tok"] > 1
    scaling = 1.0 if normalize else cfg.get("routed_scaling_factor", 1.0)
    return _deepseek({**cfg, "rope_interleave": True}, routing, normalize, scaling)


def deepseek_v3(cfg: dict[str, Any]) -> ModelSpec:
    # Always sigmoid scores with the bias-corrected choice ("noaux_tc"), renormalised then scaled.
    normalize = bool(cfg.get("norm_topk_prob", True)) and cfg["num_experts_per_tok"] > 1
    return _deepseek(cfg, "noaux_tc", normalize, cfg.get("routed_scaling_factor", 1.0))


def gpt_oss(cfg: dict[str, Any]) -> ModelSpec:
    """gpt-oss: every layer sparse (experts intermediate_size wide, with biases and the clamped SwiGLU),
    a router with a bias whose top-k logits are softmaxed (= renormalised top-k probabilities),
    attention sinks, alternating sliding and full attention, YaRN."""
    bias = cfg.get("attention_bias", True)
    num_layers = cfg["num_hidden_layers"]
    fields = _base(
        cfg, qkv_bias=bias, o_bias=bias, activation="clamped_swiglu",
        num_experts=cfg["num_local_experts"], experts_per_token=cfg["num_experts_per_tok"],
        expert_size=cfg["intermediate_size"], normalize_top_k=True, moe_layers=(True,) * num_layers,
        attn_sinks=True, router_bias=True, expert_bias=True,
        swiglu_alpha=cfg.get("swiglu_alpha", 1.702), swiglu_limit=cfg.get("swiglu_limit", 7.0),
    )
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    return ModelSpec(**fields, **_layer_layout(cfg, fields["head_dim"], layer_types, cfg.get("sliding_window")))


# Checkpoint names that differ from the ones the modules use: (regex, replacement), per architecture.
_CHECKPOINT_RENAMES: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "MixtralForCausalLM": tuple((re.compile(pattern), repl) for pattern, repl in (
        (r"\.block_sparse_moe\.", ".mlp."), (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
        (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."), (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."))),
    **dict.fromkeys(("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"), tuple(
        (re.compile(pattern), repl) for pattern, repl in (
            (r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
            (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.e_score_correction_bias")))),
    "GptOssForCausalLM": ((re.compile(r"\.mlp\.router\."), ".mlp.gate."),),
}


def checkpoint_name(architecture: str, name: str) -> str:
    """A checkpoint tensor's name in the family's common spelling (Mixtral's w1/w3/w2 are gate/up/down)."""
    for pattern, repl in _CHECKPOINT_RENAMES.get(architecture, ()):
        name = pattern.sub(repl, name)
    return name


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], ModelSpec]] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": mistral,
    "Qwen2ForCausalLM": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "GemmaForCausalLM": gemma,
    "Gemma2ForCausalLM": gemma2,
    "Gemma3ForCausalLM": gemma3,
    "Phi3ForCausalLM": phi3,
    "MixtralForCausalLM": mixtral,
    "Qwen2MoeForCausalLM": qwen2_moe,
    "Qwen3MoeForCausalLM": qwen3_moe,
    "DeepseekV2ForCausalLM": deepseek_v2,
    "DeepseekV3ForCausalLM": deepseek_v3,
    "GptOssForCausalLM": gpt_oss,
}


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    architectures = cfg.get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]({**cfg, "architectures": [arch]})
    raise UnsupportedModelError(
        f"architecture {architectures or 'unknown'} is not supported natively; "
        f"supported: {', '.join(ARCHITECTURES)}. --transformers-fallback (Python: transformers_fallback=True) "
        "runs it through transformers instead, more slowly"
    )
