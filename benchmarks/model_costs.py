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


def decode_bytes_per_token(model_dir: Path, weight_precision: str, head_precision: str | None = None) -> float:
    """Weight bytes one single-sequence decode step reads (every linear weight and the
    output head; the input embedding is a row lookup), at `weight_precision` ("fp32", "bf16",
    "int8"); `head_precision`: the output head's, where a system keeps it in another one."""
    model = model_from_config_file(Path(model_dir) / "config.json", "benchmark model")
    precision = get_precision(weight_precision)
    total = decode_weight_bytes(model, precision, concurrency=1)
    if head_precision is None:
        return total
    embed, head = embedding_split(model)
    return total + (head or embed) * (get_precision(head_precision).bytes_per_weight - precision.bytes_per_weight)


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
