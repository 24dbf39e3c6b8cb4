"""What one decode token reads and what one prompt computes, from a checkpoint's config.json.

Both come from the planner's own arithmetic (selfhost.plan), so the benchmark's
"share of the machine's limit" and `selfhost fit`'s estimates count the same bytes
and FLOPs.
"""

from __future__ import annotations

from pathlib import Path

from selfhost.catalog.hf_config import model_from_config_file
from selfhost.plan.memory import embedding_split
from selfhost.plan.precision import get_precision
from selfhost.plan.speed import attention_flops_per_token, decode_weight_bytes


def decode_bytes_per_token(model_dir: Path, weight_precision: str) -> float:
    """Weight bytes one single-sequence decode step reads (every linear weight and the
    output head; the input embedding is a row lookup), at `weight_precision` ("fp32", "bf16")."""
    model = model_from_config_file(Path(model_dir) / "config.json", "benchmark model")
    return decode_weight_bytes(model, get_precision(weight_precision), concurrency=1)


def prompt_flops(model_dir: Path, prompt_tokens: int) -> float:
    """FLOPs of one prompt's forward pass up to its first token: every linear layer for
    every prompt token, causal attention (token t attends to t tokens), and the output
    head for the last token only (engines compute no logits for the others)."""
    model = model_from_config_file(Path(model_dir) / "config.json", "benchmark model")
    embed, head = embedding_split(model)
    head = head or embed
    linear_params = model.arch.total_params() - embed - (0 if model.arch.tied_embeddings else head)
    attention = attention_flops_per_token(model, 1) * prompt_tokens * (prompt_tokens + 1) / 2
    return 2 * linear_params * prompt_tokens + attention + 2 * head
