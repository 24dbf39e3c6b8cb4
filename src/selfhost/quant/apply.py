"""Swap quantized modules into a CausalLM: on the fly, or from a quantized checkpoint.

The decoder never learns about quantization: every `Linear` (and the token
embedding) is replaced by a module with the same call signature, chosen by
the QuantConfig, and each swapped module picks its kernel once in `prepare`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.layers.rotary import RotaryEmbedding
from selfhost.models.decoder import CausalLM
from selfhost.quant.config import QuantConfig
from selfhost.quant.int4 import Int4Embedding, Int4Linear
from selfhost.quant.int8 import Int8Embedding, Int8Linear

QUANTIZED_MODULES = (Int8Linear, Int4Linear, Int8Embedding, Int4Embedding)
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"


def quantization_plan(model: CausalLM, config: QuantConfig) -> dict[str, str]:
    """{module name: method} for every module the config quantizes; raises if a layer cannot be grouped."""
    plan = {}
    for name, module in model.named_modules():
        if name in config.skip_modules:
            continue
        if name in (EMBEDDING, HEAD):
            plan[name] = config.resolved_head_method
        elif isinstance(module, nn.Linear):
            plan[name] = config.method
    if model.spec.tie_embeddings and (EMBEDDING not in plan or HEAD not in plan):
        # One tensor serves both: quantize it for both or for neither.
        plan.pop(EMBEDDING, None), plan.pop(HEAD, None)
    unknown = [n for n in config.skip_modules if n not in dict(model.named_modules())]
    if unknown:
        raise InvalidParameterError(f"skip_modules names {unknown[0]!r}, which is not a module of this model")
    config.check_layers({n: _in_features(model.get_submodule(n)) for n, m in plan.items() if m == "int4"})
    return plan


def _in_features(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features


def _quantized_like(module: nn.Module, method: str, config: QuantConfig) -> nn.Module:
    """An empty quantized module shaped like `module` (on its device)."""
    device, dtype = module.weight.device, module.weight.dtype
    if isinstance(module, nn.Embedding):
        if method == "int8":
            return Int8Embedding(module.num_embeddings, module.embedding_dim, device, dtype)
        group_size = config.group_size_for(module.embedding_dim)
        return Int4Embedding(module.num_embeddings, module.embedding_dim, group_size, device, dtype)
    bias = module.bias is not None
    if method == "int8":
        return Int8Linear(module.in_features, module.out_features, bias, device, dtype)
    return Int4Linear(module.in_features, module.out_features, bias, config.group_size_for(module.in_features), device,
                      dtype)


def _quantize(module: nn.Module, method: str, config: QuantConfig) -> nn.Module:
    if isinstance(module, nn.Embedding):
        if method == "int8":
            return Int8Embedding.from_float(module)
        return Int4Embedding.from_float(module, config.group_size_for(module.embedding_dim), config.symmetric)
    if method == "int8":
        return Int8Linear.from_float(module)
    return Int4Linear.from_float(module, config.group_size_for(module.in_features), config.symmetric)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tie_head(model: CausalLM) -> None:
    """A tied output head reads the embedding's quantized rows: one stored copy."""
    embed = model.model.embed_tokens
    rows, cols = embed.num_embeddings, embed.embedding_dim
    with torch.device("meta"):  # placeholders only: the embedding's tensors replace them below
        if isinstance(embed, Int8Embedding):
            head = Int8Linear(cols, rows, False, dtype=embed.out_dtype)
        else:
            head = Int4Linear(cols, rows, False, embed.group_size, dtype=embed.out_dtype)
    for buffer in ("qweight", "scales", "zeros"):
        if hasattr(embed, buffer):
            setattr(head, buffer, getattr(embed, buffer))
    head.tied_to_embedding = True  # its stored bytes are the embedding's
    model.lm_head = head


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_MODULES) for m in model.modules())


@torch.no_grad()
def quantize_model(model: CausalLM, config: QuantConfig, kernel: str | None = None) -> CausalLM:
    """Quantize a loaded full-precision model in place; returns it.

    `kernel` forces one kernel for every module (tests use it to check the
    fallback); by default each module picks the fastest for its device.
    """
    if _is_quantized(model):
        raise InvalidParameterError("this model is already quantized; load its full-precision checkpoint instead")
    plan = quantization_plan(model, config)
    tied = model.spec.tie_embeddings and EMBEDDING in plan and HEAD in plan
    for name, method in plan.items():
        if tied and name == HEAD:
            continue
        _swap(model, name, _quantize(model.get_submodule(name), method, config))
    if tied:
        _tie_head(model)
    _prepare(model, kernel)
    model.quant_config = config
    return model


def _prepare(model: nn.Module, kernel: str | None) -> None:
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            module.prepare(kernel if kernel and isinstance(module, (Int8Linear, Int4Linear)) else None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a model holds: quantized modules in their stored format
    (scales and zero points included), every other parameter at its dtype."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            # A tied head stores nothing of its own (the fbgemm kernel does keep a packed copy in RAM).
            total += 0 if getattr(module, "tied_to_embedding", False) else module.storage_bytes
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


@torch.no_grad()
def load_quantized_model(model_dir: Path, cfg: dict, dtype: torch.dtype, device: torch.device,
                         max_len: int | None = None) -> CausalLM:
    """Build a CausalLM with quantized modules from a checkpoint written by `selfhost quantize`.

    Tensors keep the source checkpoint's names (`q_proj.qweight`, ...) and are
    copied into their rows of our fused modules, as the full-precision loader does.
    """
    from selfhost.models.families import PACKED_WEIGHTS, spec_from_config
    from selfhost.models.loader import shard_slices, iter_tensors, weight_files

    config = QuantConfig.from_json(cfg["quantization_config"])
    spec = spec_from_config(cfg)
    max_len = min(max_len or spec.max_position, spec.max_position)
    with torch.device("meta"):
        model = CausalLM(spec, max_len)
        plan = quantization_plan(model, config)
        tied = spec.tie_embeddings and EMBEDDING in plan and HEAD in plan
        for name, method in plan.items():
            if not (tied and name == HEAD):
                _swap(model, name, _quantized_like(model.get_submodule(name), method, config))
    model.to_empty(device=device)
    model.to(dtype)  # floating tensors only: int8/uint8 weights keep their dtype
    for module in model.modules():  # scales keep their stored precision; embeddings output the model dtype
        if isinstance(module, (Int8Linear, Int8Embedding)):
            module.scales = module.scales.float()
        elif isinstance(module, (Int4Linear, Int4Embedding)):
            module.scales = module.scales.half()
        if isinstance(module, (Int8Embedding, Int4Embedding)):
            module.out_dtype = dtype
    # CausalLM.reset_rotaries reads lm_head.weight's device, which a quantized head lacks.
    model.rotaries = nn.ModuleList(RotaryEmbedding(r, max_len).to(device) for r in spec.ropes)

    targets = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if not n.startswith("rotaries")}
    slices = shard_slices(spec)
    filled: dict[str, int] = {}
    for name, tensor in iter_tensors(weight_files(model_dir, allow_pickle=False)):
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        rows = slice(None)
        if module in PACKED_WEIGHTS:
            fused, shard = PACKED_WEIGHTS[module]
            name = f"{parent}.{fused}.{leaf}"
            rows = slice(*slices[fused][shard])
        target = targets.get(name)
        if target is None:
            continue
        if target[rows].shape != tensor.shape:
            raise UnsupportedModelError(
                f"tensor {name} has shape {tuple(tensor.shape)}, the quantization config implies {tuple(target[rows].shape)}"
            )
        target[rows].copy_(tensor)
        filled[name] = filled.get(name, 0) + target[rows].shape[0]

    if tied:
        _tie_head(model)
        targets = {n: t for n, t in targets.items() if not n.startswith(HEAD + ".")}
    elif spec.tie_embeddings:
        model.tie_weights()
        targets.pop("lm_head.weight", None)
    missing = [n for n, t in targets.items() if filled.get(n, 0) != t.shape[0]]
    if missing:
        raise UnsupportedModelError(f"quantized checkpoint {model_dir} lacks tensors: {', '.join(missing[:5])}")
    _prepare(model, None)
    model.quant_config = config
    return model.eval()
