"""Any other causal LM, run through transformers' own modeling code: slower, labelled.

The native decoder covers the families in `families.py`. For anything else
(GPT-2, Phi-2, Falcon, ...) `LLM(model, transformers_fallback=True)` loads the
checkpoint with `AutoModelForCausalLM` and the engine drives it one sequence
at a time with a per-sequence transformers cache (engine/transformers_runner.py):
same API, scheduler, sampling and server, but no paged attention, no batching
across sequences and no prefix reuse, hence the warning at load time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from selfhost.errors import UnsupportedModelError

log = logging.getLogger("selfhost")


@dataclass(frozen=True)
class FallbackSpec:
    """The few shape facts the engine needs: vocabulary and KV bytes for memory accounting."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


class TransformersModel:
    """A transformers causal LM with the attributes the engine reads from a native model."""

    owns_kv_cache = True  # keeps a transformers cache per sequence; the engine allocates no paged blocks

    def __init__(self, hf_model, spec: FallbackSpec, max_len: int):
        self.hf_model = hf_model
        self.spec = spec
        self.max_len = max_len

    def parameters(self):
        return self.hf_model.parameters()

    def buffers(self):
        return self.hf_model.buffers()


def load_transformers_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, max_len: int | None, allow_pickle: bool
) -> TransformersModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=not allow_pickle or None
        )
    except (ValueError, OSError, KeyError) as err:  # transformers' own "unknown model type / no weights" errors
        raise UnsupportedModelError(f"transformers cannot load {model_dir} either: {err}") from err
    hf_model = hf_model.to(device).eval()
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    spec = FallbackSpec(
        architecture=(config.architectures or [type(hf_model).__name__])[0],
        vocab_size=hf_model.get_output_embeddings().weight.shape[0],
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
    )
    context = getattr(text, "max_position_embeddings", None) or 2048
    log.warning(
        "%s is not supported natively: running it through transformers (slower fallback: one sequence "
        "per forward pass, no paged KV cache, no prefix caching)",
        spec.architecture,
    )
    return TransformersModel(hf_model, spec, min(max_len or context, context))
