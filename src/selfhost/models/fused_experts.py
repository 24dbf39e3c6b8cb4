"""Checkpoints that keep all of a layer's experts in one 3-D tensor -> one tensor per expert.

selfhost runs each expert as its own GatedMLP (layers/moe.py), so that the Linear kernels,
bf16 weights and int8/int4 apply per expert. gpt-oss stores `mlp.experts.gate_up_proj`
(E, hidden, 2 * inter: input-major, gate and up columns interleaved), `down_proj`
(E, inter, hidden) and their biases; OpenAI's own release stores the two products in MXFP4
instead, output-major (`gate_up_proj_blocks` + `gate_up_proj_scales`, models/mxfp4.py). At load
every such tensor is cut into `experts.{e}.gate_proj / up_proj / down_proj` weights and biases,
which the loader's one loop then packs like any other checkpoint's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from selfhost.errors import UnsupportedModelError
from selfhost.models.mxfp4 import dequantize_mxfp4

Tensors = Iterator[tuple[str, torch.Tensor]]


def _per_expert(prefix: str, kind: str, stacked: torch.Tensor, leaf: str) -> Tensors:
    """stacked (E, out, ...) output-major; gate_up rows interleave gate and up."""
    if kind == "gate_up_proj":
        yield from _per_expert(prefix, "gate_proj", stacked[:, 0::2], leaf)
        yield from _per_expert(prefix, "up_proj", stacked[:, 1::2], leaf)
        return
    for expert in range(stacked.shape[0]):
        yield f"{prefix}.{expert}.{kind}.{leaf}", stacked[expert]


def split_gpt_oss_experts(tensors: Tensors) -> Tensors:
    halves: dict[str, torch.Tensor] = {}  # an MXFP4 tensor's blocks or scales, until the other arrives
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        if not prefix.endswith(".experts"):
            yield name, tensor
        elif leaf in ("gate_up_proj", "down_proj"):  # (E, in, out) -> (E, out, in)
            yield from _per_expert(prefix, leaf, tensor.transpose(1, 2), "weight")
        elif leaf in ("gate_up_proj_bias", "down_proj_bias"):
            yield from _per_expert(prefix, leaf.removesuffix("_bias"), tensor, "bias")
        elif leaf.endswith(("_blocks", "_scales")):
            kind, _, part = leaf.rpartition("_")
            other = halves.pop(f"{prefix}.{kind}_{'scales' if part == 'blocks' else 'blocks'}", None)
            if other is None:
                halves[name] = tensor
                continue
            blocks, scales = (tensor, other) if part == "blocks" else (other, tensor)
            yield from _per_expert(prefix, kind, dequantize_mxfp4(blocks, scales), "weight")
        else:
            yield name, tensor
    if halves:
        raise UnsupportedModelError(f"MXFP4 tensors without their other half: {', '.join(sorted(halves))}")


# architecture -> how its checkpoint's fused expert tensors become per-expert ones
FUSED_EXPERT_SPLITTERS: dict[str, Callable[[Tensors], Tensors]] = {
    "GptOssForCausalLM": split_gpt_oss_experts,
}


def per_expert_tensors(architecture: str, tensors: Tensors) -> Tensors:
    splitter = FUSED_EXPERT_SPLITTERS.get(architecture)
    return tensors if splitter is None else splitter(tensors)
