"""Structured pruning: a checkpoint with fewer layers, narrower MLPs and fewer heads, not masks.

PruneConfig is what the user asks for; `plan_pruning` turns it and the measured
importance into a PrunePlan (exactly which layers, heads and channels stay);
`apply_plan` builds the smaller model of the same family and copies the kept
rows and columns into it, with the config.json that describes it.

GQA stays uniform: every KV group keeps the same number of query heads. Where a
group holds several query heads, heads are removed inside each group and every
KV head stays; where each group is one head (plain multi-head attention), whole
groups go, query and KV head together. Head size never changes, so config.json
states `head_dim` explicitly (hidden_size / num_heads no longer gives it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from selfhost.errors import InvalidParameterError
from selfhost.models.decoder import CausalLM
from selfhost.models.families import spec_from_config
from selfhost.models.spec import ModelSpec
from selfhost.shrink.importance import Importance

# MLP widths that are multiples of this stay multiples of it, so int4 groups still divide them.
MLP_WIDTH_MULTIPLE = 16
# transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim,
# so a pruned Llama must keep a head count that divides its width (the other families' configs do not check).
HEADS_MUST_DIVIDE_HIDDEN = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class PruneConfig:
    drop_layers: int = 0
    keep_layers: tuple[int, ...] | None = None  # explicit layer indices; excludes drop_layers
    mlp_width: float = 1.0  # fraction of MLP channels kept
    heads: float = 1.0  # fraction of query heads kept

    def __post_init__(self):
        if self.drop_layers < 0:
            raise InvalidParameterError(f"--drop-layers {self.drop_layers} must be >= 0")
        if self.keep_layers is not None and self.drop_layers:
            raise InvalidParameterError("pass --drop-layers or --keep-layers, not both")
        for name in ("mlp_width", "heads"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise InvalidParameterError(f"--{name.replace('_', '-')} {value} must be in (0, 1]: the fraction kept")

    @property
    def needs_importance(self) -> bool:
        return self.drop_layers > 0 or self.mlp_width < 1.0 or self.heads < 1.0


@dataclass(frozen=True)
class PrunePlan:
    keep_layers: tuple[int, ...]  # source layer indices, in order
    keep_heads: tuple[tuple[int, ...], ...]  # per kept layer: source query heads
    keep_kv_heads: tuple[tuple[int, ...], ...]  # per kept layer: source KV heads
    keep_channels: tuple[tuple[int, ...], ...]  # per kept layer: source MLP channels

    @property
    def num_heads(self) -> int:
        return len(self.keep_heads[0])

    @property
    def num_kv_heads(self) -> int:
        return len(self.keep_kv_heads[0])

    @property
    def intermediate_size(self) -> int:
        return len(self.keep_channels[0])


def _check_layers(spec: ModelSpec, cfg: PruneConfig) -> None:
    L = spec.num_layers
    if cfg.keep_layers is not None:
        bad = [i for i in cfg.keep_layers if not 0 <= i < L]
        if bad or not cfg.keep_layers or len(set(cfg.keep_layers)) != len(cfg.keep_layers):
            raise InvalidParameterError(
                f"--keep-layers {','.join(map(str, cfg.keep_layers))} must list distinct layer indices in "
                f"[0, {L - 1}], at least one"
            )
    elif cfg.drop_layers >= L:
        raise InvalidParameterError(
            f"--drop-layers {cfg.drop_layers} would leave no layer: the model has {L}; drop at most {L - 1}"
        )


def _kept_layers(spec: ModelSpec, cfg: PruneConfig, importance: Importance | None) -> tuple[int, ...]:
    _check_layers(spec, cfg)
    if cfg.keep_layers is not None:
        return tuple(sorted(cfg.keep_layers))
    if cfg.drop_layers == 0:
        return tuple(range(spec.num_layers))
    dropped = set(importance.layers_least_important_first()[: cfg.drop_layers])
    return tuple(i for i in range(spec.num_layers) if i not in dropped)


def check_request(spec: ModelSpec, cfg: PruneConfig) -> None:
    """Raise if `cfg` cannot apply to a model of `spec`: checked before calibration costs anything."""
    _check_layers(spec, cfg)
    kept_head_counts(spec, cfg.heads)
    kept_mlp_width(spec, cfg.mlp_width)


def kept_head_counts(spec: ModelSpec, fraction: float) -> tuple[int, int]:
    """(query heads, KV heads) after keeping `fraction` of the query heads with uniform GQA groups."""
    H, G = spec.num_heads, spec.num_kv_heads
    group = H // G
    target = round(H * fraction)
    if group == 1:  # one query head per KV head: whole groups go
        if target < 1:
            raise InvalidParameterError(f"--heads {fraction} keeps no head of {H}; keep at least 1/{H}")
        heads, kv_heads, step = target, target, 1
    else:  # every KV head stays, each with the same number of query heads
        if target // G < 1:
            raise InvalidParameterError(
                f"--heads {fraction} keeps {target} of {H} query heads, fewer than one per KV group ({G} groups of "
                f"{group}); keep at least {1 / group:g}"
            )
        heads, kv_heads, step = target // G * G, G, G
    if spec.architecture in HEADS_MUST_DIVIDE_HIDDEN and spec.hidden_size % heads:
        valid = [n / H for n in range(step, H + 1, step) if spec.hidden_size % n == 0]
        raise InvalidParameterError(
            f"--heads {fraction} keeps {heads} heads, which do not divide hidden_size {spec.hidden_size}; "
            f"transformers cannot load such a {spec.architecture}. Fractions that work: "
            f"{', '.join(f'{v:g}' for v in valid)}"
        )
    return heads, kv_heads


def kept_mlp_width(spec: ModelSpec, fraction: float) -> int:
    width = spec.intermediate_size
    if width % MLP_WIDTH_MULTIPLE == 0:
        return max(MLP_WIDTH_MULTIPLE, round(width * fraction / MLP_WIDTH_MULTIPLE) * MLP_WIDTH_MULTIPLE)
    return max(1, round(width * fraction))


def _top(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    """Indices of the `count` highest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    return tuple(sorted(order[:count]))


def plan_pruning(spec: ModelSpec, cfg: PruneConfig, importance: Importance | None) -> PrunePlan:
    """Which layers, heads and channels stay; `importance` may be None only when nothing needs choosing."""
    if cfg.needs_importance and importance is None:
        raise InvalidParameterError("pruning by importance needs calibration text (--calibration)")
    layers = _kept_layers(spec, cfg, importance)
    num_heads, num_kv = kept_head_counts(spec, cfg.heads)
    width = kept_mlp_width(spec, cfg.mlp_width)
    group = spec.num_heads // spec.num_kv_heads
    heads, kv_heads, channels = [], [], []
    for layer in layers:
        if num_heads == spec.num_heads:
            q, kv = tuple(range(spec.num_heads)), tuple(range(spec.num_kv_heads))
        elif group == 1:
            q = kv = _top(importance.head_scores[layer], num_heads)
        else:  # the best heads of every group; every KV head stays
            per_group = num_heads // spec.num_kv_heads
            scores = importance.head_scores[layer].view(spec.num_kv_heads, group)
            q = tuple(g * group + h for g in range(spec.num_kv_heads) for h in _top(scores[g], per_group))
            kv = tuple(range(spec.num_kv_heads))
        heads.append(q)
        kv_heads.append(kv)
        channels.append(tuple(range(spec.intermediate_size)) if width == spec.intermediate_size
                        else _top(importance.channel_scores[layer], width))
    return PrunePlan(layers, tuple(heads), tuple(kv_heads), tuple(channels))


def pruned_config(config: dict, spec: ModelSpec, plan: PrunePlan) -> dict:
    """config.json of the pruned model: the source's, with the new counts (and per-layer lists cut to match)."""
    out = copy.deepcopy(config)
    out.update(num_hidden_layers=len(plan.keep_layers), num_attention_heads=plan.num_heads,
               num_key_value_heads=plan.num_kv_heads, intermediate_size=plan.intermediate_size,
               head_dim=spec.head_dim)
    layer_types = config.get("layer_types")
    if layer_types is None and (len(set(spec.layer_windows)) > 1 or len(set(spec.layer_rope)) > 1):
        # A pattern (Gemma's every-sixth-layer-global) would shift once layers go: spell out each kept layer's type.
        layer_types = ["sliding_attention" if w is not None else "full_attention" for w in spec.layer_windows]
    if layer_types is not None:
        out["layer_types"] = [layer_types[i] for i in plan.keep_layers]
    return out


def _rows(spec: ModelSpec, plan_index: int, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Index tensors of the kept rows/columns of one layer's fused projections."""
    D, q_size, kv_size = spec.head_dim, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    heads = lambda ids, offset: [offset + h * D + d for h in ids for d in range(D)]  # noqa: E731
    q_cols = heads(plan.keep_heads[plan_index], 0)
    kv = plan.keep_kv_heads[plan_index]
    channels = list(plan.keep_channels[plan_index])
    return {
        "qkv": torch.tensor(q_cols + heads(kv, q_size) + heads(kv, q_size + kv_size)),
        "q": torch.tensor(q_cols),
        "gate_up": torch.tensor(channels + [spec.intermediate_size + c for c in channels]),
        "channels": torch.tensor(channels),
    }


# (module path inside a layer, tensor) -> how the kept part is cut from the source tensor.
_LAYER_CUTS = {
    ("self_attn.qkv_proj", "weight"): lambda t, idx: t[idx["qkv"]],
    ("self_attn.qkv_proj", "bias"): lambda t, idx: t[idx["qkv"]],
    ("self_attn.o_proj", "weight"): lambda t, idx: t[:, idx["q"]],
    ("mlp.gate_up_proj", "weight"): lambda t, idx: t[idx["gate_up"]],
    ("mlp.gate_up_proj", "bias"): lambda t, idx: t[idx["gate_up"]],
    ("mlp.down_proj", "weight"): lambda t, idx: t[:, idx["channels"]],
}


@torch.no_grad()
def apply_plan(model: CausalLM, config: dict, plan: PrunePlan) -> tuple[CausalLM, dict]:
    """A new, smaller fp32 CausalLM holding the kept weights of `model`, and its config.json."""
    new_config = pruned_config(config, model.spec, plan)
    new_spec = spec_from_config(new_config)
    with torch.device("meta"):
        pruned = CausalLM(new_spec, model.max_len)
    pruned.to_empty(device="cpu")
    pruned.reset_rotaries()
    pruned.tie_weights()
    source = dict(model.named_parameters())
    layer_rows = [_rows(model.spec, i, plan) for i in range(len(plan.keep_layers))]
    for name, param in pruned.named_parameters():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            new_index = int(index)
            module, _, leaf = rest.rpartition(".")
            tensor = source[f"model.layers.{plan.keep_layers[new_index]}.{rest}"]
            cut = _LAYER_CUTS.get((module, leaf))
            tensor = cut(tensor, layer_rows[new_index]) if cut else tensor
        else:
            tensor = source[name]
        assert param.shape == tensor.shape, (name, param.shape, tensor.shape)
        param.copy_(tensor.float())
    return pruned.eval(), new_config
