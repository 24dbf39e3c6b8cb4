"""Store a loaded fp32 CPU model's linear weights in bf16 (activations stay fp32).

See layers/bf16_linear.py for why and how the products run. Norm weights,
embeddings and rotary tables stay fp32: they are a small share of the bytes a
step reads. The weight layout follows the CPU (AMX's tile layout where it has AVX-512), and
the switch between the few-row kernel and the many-row product is measured once
here, on the model's own layer width, and handed to every layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from selfhost.layers.bf16_linear import Bf16Linear, best_layout, many_rows_product, measure_few_rows_max
from selfhost.layers.linear import Linear
from selfhost.models.decoder import CausalLM
from selfhost.models.weight_arena import place_weights_in_arena

log = logging.getLogger(__name__)


@torch.no_grad()
def use_bf16_weights(model: CausalLM) -> int:
    """Replace every Linear (output head included) by a Bf16Linear; returns the measured few-rows switch."""
    spec, layout = model.spec, best_layout()
    few_rows_max = measure_few_rows_max(spec.hidden_size, spec.intermediate_size, layout)
    for name, module in list(model.named_modules()):
        if type(module) is Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Bf16Linear.from_linear(module, few_rows_max, layout))
    # The fp32 arena stays alive while any parameter views it: move everything into a new, smaller one.
    place_weights_in_arena(model, keep_values=True)
    model.bf16_few_rows_max = few_rows_max
    log.info("linear weights in bf16 (%s layout): selfhost's AVX-512 kernel up to %d rows, %s beyond (measured)",
             layout, few_rows_max, many_rows_product(layout))
    return few_rows_max


def uses_bf16_weights(model) -> bool:
    """Whether the model's linears hold bf16 weights (never for the transformers fallback, not an nn.Module)."""
    return isinstance(model, nn.Module) and any(isinstance(m, Bf16Linear) for m in model.modules())


def weight_dtype_name(model, dtype: torch.dtype) -> str:
    """What the linear weights are stored as: a quantization method, bfloat16, or the model's dtype."""
    quant_config = getattr(model, "quant_config", None)
    if quant_config is not None:
        return quant_config.method
    return "bfloat16" if uses_bf16_weights(model) else str(dtype).removeprefix("torch.")


def linear_kernels(model) -> str:
    """Which products a model's linear layers run on this CPU, in words (for stats and /metrics)."""
    from selfhost.layers import linear

    if not isinstance(model, nn.Module):
        return "transformers' own modules (fallback)"
    layer = next((m for m in model.modules() if isinstance(m, Bf16Linear)), None)
    if layer is not None:
        few = f"AVX-512 up to {layer.few_rows_max} rows, " if layer.few_rows_max else ""
        return f"bf16 weights: {few}{many_rows_product(layer.layout)} beyond"
    fp32 = next((m for m in model.modules() if type(m) is Linear), None)
    if fp32 is None:
        return "torch (quantized or fallback modules)"
    if linear.USE_GEMM:
        if fp32.blas_from_rows == Linear.blas_from_rows:
            return "fp32: selfhost AVX-512 GEMM"
        return f"fp32: selfhost AVX-512 GEMM up to {fp32.blas_from_rows - 1} rows, torch (MKL) beyond (measured)"
    if linear.USE_MATVEC:
        return f"fp32: selfhost AVX2 up to {linear.MATVEC_MAX_ROWS} rows, torch beyond"
    return "fp32: torch"
