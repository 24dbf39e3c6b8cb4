"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each tensor after the module it adapts, under its own wrapper:
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` is A, shape
(r, in_features); `...lora_B.weight` is B, shape (out_features, r). The layer's
output gains `scale * B @ A @ x`, with scale = lora_alpha / r, or
lora_alpha / sqrt(r) when `use_rslora` is set; `rank_pattern` and
`alpha_pattern` override r and alpha for the modules whose names they match.

Only what selfhost can apply exactly is accepted: plain LoRA on the seven
decoder projections, no DoRA, no trained biases, no extra saved modules.
Anything else is refused with the name of the offending field or tensor.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfhost.lora.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # older PEFT versions' torch.save pickle: read only on opt-in

# The projections selfhost can adapt, and the decoder block that holds each one. Checkpoints
# that fuse q/k/v or gate/up themselves (Phi-3) name those modules `qkv_proj`, `gate_up_proj`.
SPLIT_MODULES: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
TARGET_MODULES: dict[str, str] = {**SPLIT_MODULES, "qkv_proj": "self_attn", "gate_up_proj": "mlp"}
# `--targets q,k,v` short names.
SHORT_NAMES = {name.removesuffix("_proj"): name for name in SPLIT_MODULES}

_TENSOR_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoraConfig:
    """What `adapter_config.json` says, reduced to what changes the adapter's output."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise AdapterError(f"LoRA rank r={self.rank} must be at least 1")
        unknown = sorted(set(self.target_modules) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"unknown target module(s) {', '.join(unknown)}; "
                               f"selfhost adapts {', '.join(TARGET_MODULES)}")

    def _pattern_value(self, patterns: dict, module_name: str, default):
        # PEFT's rule: a key matches a module whose dotted name ends with it (the key is a regex).
        for key, value in patterns.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
                return value
        return default

    def rank_of(self, module_name: str) -> int:
        """r of the module with this dotted name (`model.layers.0.self_attn.q_proj`)."""
        return self._pattern_value(self.rank_pattern, module_name, self.rank)

    def scale_of(self, module_name: str) -> float:
        rank = self.rank_of(module_name)
        alpha = self._pattern_value(self.alpha_pattern, module_name, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_json(self) -> dict:
        """adapter_config.json as PEFT writes it, so PEFT and vLLM load it as they load their own."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": sorted(self.target_modules),
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }


# Config fields that would change the output in ways selfhost does not implement: name -> the neutral values.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
}


def parse_config(raw: dict, source: str) -> LoraConfig:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported (only 'LORA')")
    for name, neutral in _UNSUPPORTED.items():
        if raw.get(name) not in neutral:
            raise AdapterError(f"{source}: {name}={raw[name]!r} is not supported by selfhost's LoRA")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # a regex or "all-linear": the tensors say which modules are adapted
        targets = list(TARGET_MODULES) if targets == "all-linear" else []
    try:
        return LoraConfig(
            rank=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            target_modules=tuple(targets or ()),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )
    except KeyError as err:
        raise AdapterError(f"{source} lacks the field {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{source}: {err}") from None


@dataclass(frozen=True)
class ModuleAdapter:
    """A and B of one adapted projection, and the scale of their product."""

    lora_a: torch.Tensor  # (r, in_features)
    lora_b: torch.Tensor  # (out_features, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: what merging adds to the base weight, (out_features, in_features)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale


@dataclass(frozen=True)
class Adapter:
    config: LoraConfig
    # (layer index, module name such as "q_proj") -> its A and B
    modules: dict[tuple[int, str], ModuleAdapter]

    @property
    def num_params(self) -> int:
        return sum(m.lora_a.numel() + m.lora_b.numel() for m in self.modules.values())


def module_path(layer_idx: int, module: str) -> str:
    """The dotted name transformers (and PEFT's patterns) give a projection."""
    return f"model.layers.{layer_idx}.{TARGET_MODULES[module]}.{module}"


def tensor_name(layer_idx: int, module: str, which: str) -> str:
    return f"base_model.model.{module_path(layer_idx, module)}.lora_{which}.weight"


def read_adapter(folder: Path, allow_pickle: bool = False) -> Adapter:
    """Load a PEFT adapter folder; every tensor is checked to belong to a supported module, in A/B pairs.

    The weights are `adapter_model.safetensors`; a folder with only `adapter_model.bin` (a pickle,
    which can run code when read) is refused unless `allow_pickle`."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    if not config_path.is_file():
        raise AdapterError(f"{folder} is not a LoRA adapter folder: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path} must hold a JSON object")
    config = parse_config(raw, str(config_path))
    weights_path = _load_weights_path(folder, allow_pickle)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in _load_tensors(weights_path).items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or TARGET_MODULES.get(match[3]) != match[2]:
            raise AdapterError(f"{weights_path.name}: tensor {name} is not a LoRA A/B of a module selfhost adapts "
                               f"({', '.join(TARGET_MODULES)})")
        halves.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor
    modules = {}
    for (layer_idx, module), pair in sorted(halves.items()):
        path = module_path(layer_idx, module)
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights_path.name}: {path} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"], pair["B"]
        rank = config.rank_of(path)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank r={rank} "
                               f"(A must be (r, in), B (out, r))")
        modules[(layer_idx, module)] = ModuleAdapter(a, b, config.scale_of(path))
    if not modules:
        raise AdapterError(f"{weights_path} holds no LoRA tensors")
    return Adapter(config, modules)


def _load_weights_path(folder: Path, allow_pickle: bool) -> Path:
    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    if (folder / PICKLE_WEIGHTS_FILE).is_file():
        if not allow_pickle:
            raise AdapterError(f"{folder} holds {PICKLE_WEIGHTS_FILE}, a pickle that can run code when it is read; "
                               f"convert it to {WEIGHTS_FILE}, or allow pickle files (selfhost serve "
                               "--lora-allow-pickle) if you trust where it came from")
        return folder / PICKLE_WEIGHTS_FILE
    raise AdapterError(f"{folder} is not a LoRA adapter folder: {WEIGHTS_FILE} is missing")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name == WEIGHTS_FILE:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise AdapterError(f"{path} is not a readable safetensors file: {err}") from None
    try:  # weights_only: tensors and plain containers, no arbitrary objects, even on opt-in
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise AdapterError(f"{path} cannot be read as a weights-only pickle: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path} does not hold a dictionary of tensors")
    return state


def write_adapter(folder: Path, adapter: Adapter) -> None:
    """Write the two files into an existing (staging) folder; the caller makes the folder appear atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for (layer_idx, module), m in adapter.modules.items():
        tensors[tensor_name(layer_idx, module, "A")] = m.lora_a.detach().float().contiguous()
        tensors[tensor_name(layer_idx, module, "B")] = m.lora_b.detach().float().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")
