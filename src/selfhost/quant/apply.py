"""Swap quantized modules into a CausalLM: on the fly, or to load a quantized checkpoint.

The decoder never learns about quantization: every `Linear` (and the token
embedding) is replaced by a module with the same call signature, chosen by
the QuantConfig, and each swapped module picks its kernel once in `prepare`.
Loading is models/loader.py's: for a quantized checkpoint it calls
`swap_in_empty_modules` on the meta model, `tie_embeddings`, fills the
tensors with its one loop, then calls `prepare_loaded`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from selfhost.errors import InvalidParameterError
from selfhost.layers.moe import expert_module_ids
from selfhost.models.decoder import CausalLM
from selfhost.quant.config import QuantConfig
from selfhost.quant.int4 import Int4Embedding, Int4Linear
from selfhost.quant.int8 import Int8Embedding, Int8Linear, default_int8_kernel
from selfhost.quant.int8_products import NEVER, amx_from_rows, vnni_from_rows, widened_from_rows

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
    """An empty quantized module shaped like `module` (on its device; outputs in its dtype)."""
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
    vnni_switch = _int8_vnni_from_rows(model, kernel)
    int8_switch = _int8_measured_switch(model, kernel, widened_from_rows)  # NEVER where VNNI runs without AMX
    amx_switch = _int8_measured_switch(model, kernel, amx_from_rows)
    # A mixture's experts keep the int8 dots: their one C call (layers/moe.py) and the Python loop it is
    # checked against must run the same products.
    experts = expert_module_ids(model)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            if id(module) in experts:
                module.prepare(kernel, sys.maxsize, sys.maxsize)
            else:
                module.prepare(kernel, int8_switch, vnni_switch, amx_switch)
        elif isinstance(module, QUANTIZED_MODULES):
            module.prepare(kernel if kernel and isinstance(module, Int4Linear) else None)


def _int8_vnni_from_rows(model: nn.Module, kernel: str | None) -> int:
    """The int8 layers' switch to the VNNI kernel, where they run the "avx2" kernel on the CPU."""
    layer = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if layer is None or (kernel or default_int8_kernel(layer.qweight.device)) != "avx2":
        return NEVER
    return vnni_from_rows()


def _int8_measured_switch(model: nn.Module, kernel: str | None, switch) -> int:
    """`switch(hidden, intermediate, threads)` (a measured row switch of int8_products.py) where the
    int8 layers run the "avx2" kernel on the CPU; never elsewhere."""
    spec = getattr(model, "spec", None)
    layer = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if spec is None or layer is None or (kernel or default_int8_kernel(layer.qweight.device)) != "avx2":
        return sys.maxsize
    return switch(spec.hidden_size, spec.intermediate_size, torch.get_num_threads())


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


def swap_in_empty_modules(model: CausalLM, config: QuantConfig) -> None:
    """Replace every module the config quantizes by an empty quantized one of its shape.

    Called on a meta-device model in its final dtype, before its tensors exist; a tied
    head is left for `tie_embeddings`, which shares the embedding's quantized rows.
    """
    plan = quantization_plan(model, config)
    tied = model.spec.tie_embeddings and EMBEDDING in plan and HEAD in plan
    for name, method in plan.items():
        if not (tied and name == HEAD):
            _swap(model, name, _quantized_like(model.get_submodule(name), method, config))


def tie_embeddings(model: CausalLM) -> None:
    """Tie the output head to the embedding, quantized (one stored copy of its rows) or not."""
    if isinstance(model.model.embed_tokens, QUANTIZED_MODULES):
        _tie_head(model)
    else:
        model.tie_weights()


def prepare_loaded(model: CausalLM, config: QuantConfig) -> None:
    """After a quantized checkpoint's tensors are loaded: pick each module's kernel."""
    _prepare(model, None)
    model.quant_config = config
