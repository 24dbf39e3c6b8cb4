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


def decode_step(model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int,
                queries_per_seq: int = 1) -> tuple[float, str]:
    """Seconds of one decode step and what bounds it. `queries_per_seq` > 1: a speculative
    verification, every sequence's proposed tokens checked at once (weights and each sequence's
    cached keys and values read once, the arithmetic done for every query)."""
    precision = precision.for_device_kind(device.kind)
    flops = device.peak_flops(precision.compute_dtype) * device.compute_efficiency
    matmul_flops = 2 * model.active_params  # one multiply-add per active weight
    queries = concurrency * queries_per_seq
    step_bytes = decode_weight_bytes(model, precision, queries) + kv_cache_bytes(
        model, precision, context, concurrency
    )
    memory_time_s = step_bytes / device.decode_bandwidth(precision.weight_bits, step_bytes)
    compute_time_s = queries * (matmul_flops + attention_flops_per_token(model, context)) / flops
    overhead_s = decode_overhead_s(model)
    device_time_s = max(memory_time_s, compute_time_s)
    # A CPU runs the Python overhead and the kernels on the same cores, one after the
    # other; an accelerator runs its kernels while the host queues the next ones.
    step_s = device_time_s + overhead_s if device.kind == "cpu" else max(device_time_s, overhead_s)
    bound = "memory" if memory_time_s >= compute_time_s else "compute"
    if overhead_s > device_time_s:
        bound = "overhead"
    return step_s, bound


def estimate_speed(
    model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int
) -> SpeedEstimate:
    step_s, bound = decode_step(model, device, precision, context, concurrency)
    precision = precision.for_device_kind(device.kind)
    bandwidth = device.decode_bandwidth(precision.weight_bits)
    flops = device.peak_flops(precision.compute_dtype) * device.compute_efficiency
    matmul_flops = 2 * model.active_params

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


@dataclass(frozen=True)
class SpeculativeEstimate:
    tokens_per_step: float  # expected tokens a sequence gains per verification
    decode_tok_s_per_seq: float
    speedup: float  # over plain decoding at the same concurrency


def expected_tokens_per_step(acceptance: float, num_tokens: int) -> float:
    """Tokens appended per verification when each proposal is accepted with probability `acceptance`
    independently, up to the first rejection, plus the target's own token: 1 + a + a^2 + ... + a^k."""
    return float(num_tokens + 1) if acceptance >= 1 else (1 - acceptance ** (num_tokens + 1)) / (1 - acceptance)


def estimate_speculative(model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int,
                         acceptance: float, num_tokens: int, draft: ModelSpec | None = None) -> SpeculativeEstimate:
    """Decode speed with `num_tokens` proposals per step accepted at rate `acceptance`; `draft`: the model
    that proposes (one decode step of it per proposed token), or None for prompt lookup (free)."""
    plain_s, _ = decode_step(model, device, precision, context, concurrency)
    verify_s, _ = decode_step(model, device, precision, context, concurrency, queries_per_seq=num_tokens + 1)
    propose_s = num_tokens * decode_step(draft, device, precision, context, concurrency)[0] if draft else 0.0
    gained = expected_tokens_per_step(acceptance, num_tokens)
    per_seq = gained / (verify_s + propose_s)
    return SpeculativeEstimate(gained, per_seq, per_seq * plain_s)
