"""Store a loaded fp32 CPU model's linear weights in bf16 (activations stay fp32).

See layers/bf16_linear.py for why and how the products run. Norm weights,
embeddings and rotary tables stay fp32: they are a small share of the bytes a
step reads. The switch between the C kernel and torch's bf16 matmul is measured
once here, on the model's own layer width, and handed to every layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from selfhost.layers.bf16_linear import Bf16Linear, measure_few_rows_max
from selfhost.layers.linear import Linear
from selfhost.models.decoder import CausalLM
from selfhost.models.weight_arena import place_weights_in_arena

log = logging.getLogger(__name__)


@torch.no_grad()
def use_bf16_weights(model: CausalLM) -> int:
    """Replace every Linear (output head included) by a Bf16Linear; returns the measured few-rows switch."""
    spec = model.spec
    few_rows_max = measure_few_rows_max(spec.hidden_size, spec.intermediate_size)
    for name, module in list(model.named_modules()):
        if type(module) is Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Bf16Linear.from_linear(module, few_rows_max))
    # The fp32 arena stays alive while any parameter views it: move everything into a new, smaller one.
    place_weights_in_arena(model, keep_values=True)
    model.bf16_few_rows_max = few_rows_max
    log.info("linear weights in bf16: selfhost's kernel up to %d rows, torch's bf16 matmul beyond (measured)",
             few_rows_max)
    return few_rows_max


def uses_bf16_weights(model: nn.Module) -> bool:
    return any(isinstance(m, Bf16Linear) for m in model.modules())
