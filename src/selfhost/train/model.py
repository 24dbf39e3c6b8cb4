"""A fresh Llama model: its config.json, built with the engine's own CausalLM.

The model is built from the very config dict that export writes as
config.json, through the same `spec_from_config` the loader uses, so what is
trained is what the engine (and transformers) will later run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfhost.models.decoder import CausalLM
from selfhost.models.families import spec_from_config
from selfhost.train.config import ModelShape

RMS_NORM_EPS = 1e-5
INIT_STD = 0.02


def llama_config(shape: ModelShape, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int | None) -> dict:
    """Hugging Face config.json contents for `shape` with the tokenizer's vocabulary and special ids."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context_len,
        "rms_norm_eps": RMS_NORM_EPS,
        # Older transformers read rope_theta, newer ones rope_parameters: write both.
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def build_model(config: dict, seed: int, device: torch.device) -> CausalLM:
    """A randomly initialised fp32 CausalLM; the same seed gives the same weights."""
    spec = spec_from_config(config)
    torch.manual_seed(seed)
    with device:
        model = CausalLM(spec, config["max_position_embeddings"])
    model.tie_weights()
    init_weights(model, spec.num_layers)
    return model


def init_weights(model: CausalLM, num_layers: int) -> None:
    """Small normal weights; projections that write into the residual stream are
    scaled down by depth so the stream's variance does not grow with layers."""
    residual_std = INIT_STD / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
