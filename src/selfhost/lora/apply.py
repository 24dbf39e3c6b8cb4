"""Put LoRA adapters onto selfhost's CausalLM, and take trained ones back off.

selfhost fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`
(models/families.py, PACKED_WEIGHTS). PEFT adapts each of them separately, so
a fused projection carries one A/B pair per shard it adapts, and each pair's
product lands in that shard's rows of the fused output:

    out[:, rows_q] += scale_q * (x @ A_q^T) @ B_q^T      (T, q_size)

`LoRALinear` wraps the unchanged base module (full precision or quantized) and
adds those products; the base weights are never copied or modified.
"""

from __future__ import annotations

import torch
from torch import nn

from selfhost.lora.adapter_format import (
    TARGET_MODULES,
    Adapter,
    AdapterError,
    LoraConfig,
    ModuleAdapter,
)
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS
from selfhost.models.loader import shard_slices
from selfhost.models.spec import ModelSpec


class LoRALinear(nn.Module):
    """base(x) plus, per adapted shard of the output rows, scale * (x @ A^T) @ B^T."""

    def __init__(self, base: nn.Module, shards: list[tuple[str, int, int, float]], ranks: list[int],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.shard_names = [name for name, *_ in shards]  # PEFT module names, e.g. ["q_proj", "v_proj"]
        self.rows = [(start, end) for _, start, end, _ in shards]
        self.scales = [scale for *_, scale in shards]
        in_features = base.in_features
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device)) for r in ranks)
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(end - start, r, dtype=dtype, device=device))
            for (start, end), r in zip(self.rows, ranks))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        out = self.base.forward(x, num_threads)  # (T, out_features)
        for a, b, (start, end), scale in zip(self.lora_A, self.lora_B, self.rows, self.scales):
            low = (x.to(a.dtype) @ a.t()) * scale  # (T, r)
            out[..., start:end] += (low @ b.t()).to(out.dtype)  # (T, end - start)
        return out


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each adaptable projection, per transformers' unfused layout."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    h, inter = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
            "qkv_proj": (q + 2 * kv, h), "gate_up_proj": (2 * inter, h)}


def check_fits(adapter: Adapter, spec: ModelSpec) -> None:
    """Raise if any A/B pair does not match the base model's layer count or projection shapes."""
    shapes = expected_shapes(spec)
    for (layer_idx, module), m in adapter.modules.items():
        if layer_idx >= spec.num_layers:
            raise AdapterError(f"the adapter has weights for layer {layer_idx}, the base model has "
                               f"{spec.num_layers} layers: it was made for another base model")
        out_features, in_features = shapes[module]
        if m.lora_a.shape[1] != in_features or m.lora_b.shape[0] != out_features:
            raise AdapterError(
                f"layer {layer_idx} {module}: the adapter's A {tuple(m.lora_a.shape)} and B {tuple(m.lora_b.shape)} "
                f"need a projection of shape ({m.lora_b.shape[0]}, {m.lora_a.shape[1]}), the base model's is "
                f"({out_features}, {in_features}): the adapter was made for another base model")


def _fused_name(module: str) -> tuple[str, int | None]:
    """selfhost's module holding `module`, and its shard index there (None: not fused)."""
    return PACKED_WEIGHTS.get(module, (module, None))


def _wrap(model: CausalLM, plan: dict[tuple[int, str], list[tuple[str, int, int, float, int]]],
          dtype: torch.dtype) -> dict[tuple[int, str], LoRALinear]:
    wrapped = {}
    device = model.model.norm.weight.device  # embeddings and head may be quantized: no .weight
    from selfhost.lora.serving import MultiLoRALinear  # serving builds on this module

    if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):  # never a half-wrapped model
        raise AdapterError("the model already carries adapters; load the base again to apply another")
    for (layer_idx, fused), shards in plan.items():
        layer = model.model.layers[layer_idx]
        parent = layer.self_attn if TARGET_MODULES.get(shards[0][0]) == "self_attn" else layer.mlp
        base = getattr(parent, fused)
        shards = sorted(shards, key=lambda s: s[1])
        lora = LoRALinear(base, [s[:4] for s in shards], [s[4] for s in shards], dtype, device)
        setattr(parent, fused, lora)
        wrapped[(layer_idx, fused)] = lora
    return wrapped


def _plan(spec: ModelSpec, entries: dict[tuple[int, str], tuple[float, int]]):
    """Group (layer, PEFT module) -> (scale, rank) by selfhost's fused module, with each shard's output rows."""
    slices = shard_slices(spec)
    shapes = expected_shapes(spec)
    plan: dict[tuple[int, str], list] = {}
    for (layer_idx, module), (scale, rank) in entries.items():
        fused, shard = _fused_name(module)
        start, end = (0, shapes[module][0]) if shard is None else slices[fused][shard]
        plan.setdefault((layer_idx, fused), []).append((module, start, end, scale, rank))
    return plan


@torch.no_grad()
def apply_adapter(model: CausalLM, adapter: Adapter, dtype: torch.dtype | None = None) -> None:
    """Wrap every adapted projection of `model` in a LoRALinear holding the adapter's A and B (copied).

    dtype: of the adapter weights; default the model's activations' (fp32 for a quantized base).
    """
    check_fits(adapter, model.spec)
    dtype = dtype or model.model.norm.weight.dtype  # the activations'
    entries = {key: (m.scale, m.rank) for key, m in adapter.modules.items()}
    wrapped = _wrap(model, _plan(model.spec, entries), dtype)
    for (layer_idx, module), m in adapter.modules.items():
        lora = wrapped[(layer_idx, _fused_name(module)[0])]
        i = lora.shard_names.index(module)
        lora.lora_A[i].copy_(m.lora_a)
        lora.lora_B[i].copy_(m.lora_b)


def add_trainable_adapter(model: CausalLM, config: LoraConfig, seed: int) -> list[nn.Parameter]:
    """Fresh adapters on every layer's target modules, initialised as PEFT does (B = 0, so the
    model starts out as the base); returns the trainable parameters. The caller freezes the base."""
    generator = torch.Generator().manual_seed(seed)
    entries = {}
    for layer_idx in range(model.spec.num_layers):
        for module in config.target_modules:
            path = f"model.layers.{layer_idx}.{TARGET_MODULES[module]}.{module}"
            entries[(layer_idx, module)] = (config.scale_of(path), config.rank_of(path))
    wrapped = _wrap(model, _plan(model.spec, entries), torch.float32)
    params = []
    for lora in wrapped.values():
        for a in lora.lora_A:
            # Kaiming-uniform with a = sqrt(5), nn.Linear's own default: bound 1/sqrt(in_features).
            bound = 1 / a.shape[1] ** 0.5
            with torch.no_grad():
                a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
        params.extend(lora.lora_A)
        params.extend(lora.lora_B)
    return params


def lora_modules(model: CausalLM) -> dict[tuple[int, str], LoRALinear]:
    """(layer index, fused module name) -> its LoRALinear."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            parts = name.split(".")  # model.layers.<i>.<block>.<fused>
            found[(int(parts[2]), parts[-1])] = module
    return found


def extract_adapter(model: CausalLM, config: LoraConfig) -> Adapter:
    """The adapters now on `model`, per PEFT module, as fp32 copies."""
    modules = {}
    for (layer_idx, _), lora in lora_modules(model).items():
        for name, a, b, scale in zip(lora.shard_names, lora.lora_A, lora.lora_B, lora.scales):
            modules[(layer_idx, name)] = ModuleAdapter(a.detach().float().clone(), b.detach().float().clone(), scale)
    return Adapter(config, modules)


def remove_adapters(model: CausalLM) -> None:
    """Put the base modules back in place of every LoRALinear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base)
