"""Speed estimates: decode is bound by memory bandwidth (or, for small models, by the
runtime's per-step overhead), prefill by compute."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.catalog import DeviceSpec, ModelSpec
from selfhost.plan.memory import PREFILL_CHUNK_TOKENS, embedding_split, kv_cache_bytes, weights_bytes
from selfhost.plan.precision import Precision


# What selfhost's eager decode loop costs per step besides moving weights: Python,
# PyTorch dispatch and kernel launches, about constant per layer whatever its width.
# Measured on this project's 2-core x86 machine with tiny random models of 1-16
# layers (`benchmarks/fit_calibration.py --overhead`, quiet machine, after the fused
# rotary + cache write + attention call landed: fp32 0.08 ms + 0.036 ms per layer,
# int8 0.08 ms + 0.034 ms; int4 not measured); a slower core pays more.
DECODE_STEP_OVERHEAD_S = 0.08e-3  # engine step: scheduling, sampling, logits to host
DECODE_LAYER_OVERHEAD_S = 0.036e-3


@dataclass(frozen=True)
class SpeedEstimate:
    decode_tok_s: float  # all sequences together
    decode_tok_s_per_seq: float
    decode_bound: str  # "memory", "compute" or "overhead"
    prefill_tok_s: float


def decode_overhead_s(model: ModelSpec) -> float:
    return DECODE_STEP_OVERHEAD_S + model.arch.layers * DECODE_LAYER_OVERHEAD_S


def decode_weight_bytes(model: ModelSpec, precision: Precision, concurrency: int) -> float:
    """Weight bytes one decode step reads.

    Dense models read every linear weight once per step whatever the batch. An MoE
    step reads only the experts its tokens were routed to: with k of E experts per
    token, C independent tokens touch E * (1 - (1 - k/E)^C) experts on average.
    """
    arch = model.arch
    embed, head = embedding_split(model)
    # The input embedding is a row lookup; the output head (or the tied table acting
    # as one) is read in full every step.
    head_bytes = (head or embed) * precision.bytes_per_weight
    linear = arch.total_params() - embed - head
    if arch.is_moe:
        moe_layers = arch.layers - arch.dense_layers
        expert_params = arch.mlp_params(arch.moe_intermediate)
        touched = arch.experts * (1 - (1 - arch.experts_per_token / arch.experts) ** concurrency)
        linear -= moe_layers * (arch.experts - touched) * expert_params
    return linear * precision.bytes_per_weight + head_bytes


def attention_flops_per_token(model: ModelSpec, context: int) -> float:
    """QK^T and AV for one query token against `context` cached tokens, all layers."""
    arch = model.arch
    return 4 * arch.layers * arch.heads * arch.head_dim * context


def estimate_speed(
    model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int
) -> SpeedEstimate:
    precision = precision.for_device_kind(device.kind)
    bandwidth = device.decode_bandwidth(precision.weight_bits)
    flops = device.peak_flops(precision.compute_dtype) * device.compute_efficiency
    matmul_flops = 2 * model.active_params  # one multiply-add per active weight

    step_bytes = decode_weight_bytes(model, precision, concurrency) + kv_cache_bytes(
        model, precision, context, concurrency
    )
    memory_time_s = step_bytes / device.decode_bandwidth(precision.weight_bits, step_bytes)
    compute_time_s = concurrency * (matmul_flops + attention_flops_per_token(model, context)) / flops
    overhead_s = decode_overhead_s(model)
    device_time_s = max(memory_time_s, compute_time_s)
    # A CPU runs the Python overhead and the kernels on the same cores, one after the
    # other; an accelerator runs its kernels while the host queues the next ones.
    step_s = device_time_s + overhead_s if device.kind == "cpu" else max(device_time_s, overhead_s)
    bound = "memory" if memory_time_s >= compute_time_s else "compute"
    if overhead_s > device_time_s:
        bound = "overhead"

    # A prefill chunk reads the weights once and does causal attention over half
    # the chunk on average; it is compute bound unless the chunk is tiny.
    chunk = min(context, PREFILL_CHUNK_TOKENS)
    chunk_flops = chunk * (matmul_flops + attention_flops_per_token(model, chunk) / 2)
    chunk_s = max(chunk_flops / flops, weights_bytes(model, precision) / bandwidth)
    return SpeedEstimate(
        decode_tok_s=concurrency / step_s,
        decode_tok_s_per_seq=1 / step_s,
        decode_bound=bound,
        prefill_tok_s=chunk / chunk_s,
    )
