"""A Hugging Face config.json -> the planner's Architecture and a ModelSpec, for models
outside the catalog (a local folder, a Hub checkpoint whose config is in the HF cache).

Plain dict reading, stdlib only: no transformers, no torch, no weights. Covers the
decoder families selfhost runs (Llama, Mistral, Mixtral, Qwen2/3 and their MoE,
Gemma 2/3, Phi, DeepSeek-V3's MLA) and any other config that uses the same keys.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from selfhost.catalog.architecture import Architecture
from selfhost.catalog.models import ModelSpec
from selfhost.errors import UnsupportedModelError

# model_type -> tie_word_embeddings when config.json leaves it out (transformers' class defaults)
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text", "qwen3")
# Qwen2 always has q/k/v biases, though its config.json never says so.
_QKV_BIAS_ALWAYS = ("qwen2", "qwen2_moe")
_PLAIN_MLP = ("phi",)  # up/down only, no gate
_DEFAULT_CONTEXT = 2048


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a multimodal config (Gemma 3, Mistral 3, LLaVA): `text_config`."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _sliding_layers(cfg: dict[str, Any], layers: int) -> int:
    """How many layers keep only the last `sliding_window` tokens in their KV cache."""
    if not cfg.get("sliding_window") or cfg.get("use_sliding_window") is False:
        return 0
    if isinstance(cfg.get("layer_types"), list):
        return sum(kind == "sliding_attention" for kind in cfg["layer_types"])
    model_type = cfg.get("model_type", "")
    if model_type == "gemma2":
        return layers // 2  # alternating local and global layers, local first
    if cfg.get("sliding_window_pattern"):  # Gemma 3: every pattern-th layer is global
        return layers - layers // cfg["sliding_window_pattern"]
    return layers  # Mistral v0.1, Phi-3: every layer


def _moe_fields(cfg: dict[str, Any]) -> dict[str, int]:
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    if not experts:
        return {}
    return {
        "experts": experts,
        "experts_per_token": cfg["num_experts_per_tok"],
        "shared_experts": cfg.get("n_shared_experts") or 0,
        # Mixtral's experts are full-width MLPs; Qwen-MoE and DeepSeek name their own width.
        "moe_intermediate": cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
        "dense_layers": cfg.get("first_k_dense_replace") or 0,
    }


def _mla_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("kv_lora_rank"):
        return {}
    return {"attention": "mla", "q_lora_rank": cfg.get("q_lora_rank") or 0, "kv_lora_rank": cfg["kv_lora_rank"],
            "qk_rope_head_dim": cfg["qk_rope_head_dim"], "qk_nope_head_dim": cfg["qk_nope_head_dim"],
            "v_head_dim": cfg["v_head_dim"]}


def architecture_from_config(config: dict[str, Any], source: str = "config.json") -> Architecture:
    """The planner's numbers from a Hugging Face config.json dict (`source` names it in errors)."""
    cfg = _text_config(config)
    model_type = cfg.get("model_type", "")
    try:
        layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
        fields = dict(
            layers=layers, hidden=hidden, intermediate=cfg["intermediate_size"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or hidden // heads,
            vocab=cfg["vocab_size"], max_context=cfg.get("max_position_embeddings") or _DEFAULT_CONTEXT,
            tied_embeddings=cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT),
            mlp="plain" if model_type in _PLAIN_MLP else "gated",
            qkv_bias=bool(cfg.get("attention_bias") or cfg.get("qkv_bias")) or model_type in _QKV_BIAS_ALWAYS,
            sliding_window=cfg.get("sliding_window") or None, sliding_layers=_sliding_layers(cfg, layers),
            **_moe_fields(cfg), **_mla_fields(cfg),
        )
    except KeyError as err:
        raise UnsupportedModelError(
            f"{source} has no {err.args[0]!r}: the planner reads decoder configs with num_hidden_layers, "
            "hidden_size, intermediate_size, num_attention_heads and vocab_size"
        ) from None
    if not fields["sliding_layers"]:
        fields["sliding_window"] = None
    try:
        return Architecture(**fields)
    except ValueError as err:
        raise UnsupportedModelError(f"{source}: {err}") from None


def model_from_config_file(path: Path, name: str) -> ModelSpec:
    """A ModelSpec for the checkpoint whose config.json is at `path`, called `name` in reports.

    Its parameter count is computed from the architecture (norms and any vision
    tower left out); its licence and release date are unknown.
    """
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnsupportedModelError(f"cannot read {path}: {err}") from None
    arch = architecture_from_config(config, str(path))
    return ModelSpec(
        alias=name, hf_repo=name, name=name, family=_text_config(config).get("model_type", "unknown"),
        publisher="unknown", country="", release_date=None, licence="",
        params_b=arch.total_params() / 1e9, params_source=f"computed from {path}",
        active_params_b=arch.active_params() / 1e9 if arch.is_moe else None,
        arch=arch, sources=(str(path),), retrieved=dt.date.today(),
    )
