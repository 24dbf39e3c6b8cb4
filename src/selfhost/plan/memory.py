"""Memory a model needs on a device: weights, KV cache, workspace and runtime overhead."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.catalog import DeviceSpec, ModelSpec
from selfhost.errors import InvalidParameterError
from selfhost.plan.precision import Precision

# Prompts are prefilled in chunks of at most this many tokens (selfhost's default
# max_num_batched_tokens), which bounds the activation workspace whatever the context.
PREFILL_CHUNK_TOKENS = 1024
# Fixed cost of the serving process itself (Python, PyTorch, numpy's OpenBLAS, the
# transformers tokenizer), paid in model memory only where the host process shares
# it (CPUs and unified-memory SoCs). Measured: 0.39 GB resident for selfhost with
# the 10 MB demo model (benchmarks/fit_calibration.py, torch 2.x on x86-64 Linux).
HOST_RUNTIME_BYTES = 0.38e9
# Caching allocators round and fragment: a share of every dynamic allocation is lost.
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_bytes: float
    kv_cache_bytes: float
    workspace_bytes: float
    overhead_bytes: float  # host runtime and allocator slack

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.overhead_bytes


def embedding_split(model: ModelSpec) -> tuple[int, int]:
    """(input embedding params, separate output head params; 0 when tied)."""
    table = model.arch.vocab * model.arch.hidden
    return table, (0 if model.arch.tied_embeddings else table)


def weights_bytes(model: ModelSpec, precision: Precision) -> float:
    """Stored weights: every decoder weight, embedding tables included, at the weight
    precision (selfhost quantizes the tables with the linear layers); any vision
    tower stays at activation precision."""
    vision = model.vision_params_b * 1e9
    return model.arch.total_params() * precision.bytes_per_weight + vision * precision.act_bytes



def kv_elements_per_token(model: ModelSpec, context: int) -> float:
    """KV-cache elements one sequence holds per token of its `context`, summed over layers.

    Sliding-window layers hold at most `sliding_window` tokens, so at long
    contexts they contribute less than one token's worth per token.
    """
    arch = model.arch
    if arch.attention == "mla":
        # One compressed latent plus the rotary key per layer, shared by all heads.
        per_layer = arch.kv_lora_rank + arch.qk_rope_head_dim
    else:
        per_layer = 2 * arch.kv_heads * arch.head_dim  # K and V
    full_layers = arch.layers - arch.sliding_layers
    window = min(context, arch.sliding_window) if arch.sliding_layers else 0
    held_tokens = full_layers * context + arch.sliding_layers * window
    return per_layer * held_tokens / context


def kv_bytes_per_element(model: ModelSpec, precision: Precision) -> float:
    """Bytes one KV-cache element costs: the activations' dtype, or an int8 cache's byte plus its share of
    the fp32 scale each token's key (and value) of each head carries."""
    if precision.kv_cache == "int8":
        if model.arch.attention == "mla":
            raise InvalidParameterError(f"{model.alias}: an int8 KV cache needs keys and values per head; "
                                        "latent attention caches one latent row (selfhost refuses int8 there)")
        return 1 + 4 / model.arch.head_dim
    return precision.kv_bytes


def kv_cache_bytes(model: ModelSpec, precision: Precision, context: int, concurrency: int) -> float:
    return concurrency * context * kv_elements_per_token(model, context) * kv_bytes_per_element(model, precision)


def workspace_bytes(model: ModelSpec, precision: Precision, context: int, concurrency: int) -> float:
    """Peak activations of one prefill chunk plus the fp32 logits of a decode batch."""
    arch = model.arch
    mlp_width = arch.moe_intermediate * arch.experts_per_token if arch.is_moe else arch.intermediate
    q_dim, kv_dim = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    # residual + normed input + attention output, q/k/v, and the two MLP branches
    per_token = (3 * arch.hidden + q_dim + 2 * kv_dim + 2 * mlp_width) * precision.act_bytes
    chunk = min(context, PREFILL_CHUNK_TOKENS)
    logits = concurrency * arch.vocab * 4
    return chunk * per_token + logits


def memory_breakdown(
    model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int
) -> MemoryBreakdown:
    precision = precision.for_device_kind(device.kind)
    weights = weights_bytes(model, precision)
    kv = kv_cache_bytes(model, precision, context, concurrency)
    work = workspace_bytes(model, precision, context, concurrency)
    host = HOST_RUNTIME_BYTES if device.kind in ("cpu", "soc") else 0.0
    overhead = host + ALLOCATOR_SLACK * (kv + work)
    return MemoryBreakdown(weights, kv, work, overhead)
