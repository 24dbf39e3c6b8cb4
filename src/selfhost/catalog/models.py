"""The model catalog: one `ModelSpec` per checkpoint in data/models.toml."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache

from selfhost.catalog._data import read_data
from selfhost.catalog.architecture import Architecture
from selfhost.catalog.names import unknown_name_error


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    hf_repo: str
    name: str
    family: str
    publisher: str
    country: str
    release_date: dt.date
    licence: str
    params_b: float
    params_source: str
    arch: Architecture
    sources: tuple[str, ...]
    retrieved: dt.date
    active_params_b: float | None = None
    vision_params_b: float = 0.0
    notes: str = ""

    def __post_init__(self) -> None:
        if self.params_b <= 0:
            raise ValueError(f"model {self.alias}: params_b must be > 0, got {self.params_b}")
        if not self.sources:
            raise ValueError(f"model {self.alias}: needs at least one source")
        if self.arch.is_moe != (self.active_params_b is not None):
            raise ValueError(f"model {self.alias}: active_params_b is required for MoE models and only for them")

    @property
    def weight_params(self) -> int:
        """Parameters loaded into memory: the decoder plus any vision tower in the checkpoint."""
        return self.arch.total_params() + round(self.vision_params_b * 1e9)

    @property
    def active_params(self) -> int:
        """Parameters read per generated token (a text token never runs the vision tower)."""
        return self.arch.active_params()


@cache
def load_models() -> dict[str, ModelSpec]:
    """All catalog models keyed by alias, in file order."""
    models: dict[str, ModelSpec] = {}
    for row in read_data("models.toml")["model"]:
        row = dict(row)
        arch = Architecture(**row.pop("arch"))
        spec = ModelSpec(arch=arch, sources=tuple(row.pop("sources")), **row)
        if spec.alias in models:
            raise ValueError(f"duplicate model alias {spec.alias!r} in models.toml")
        models[spec.alias] = spec
    return models


def get_model(name: str) -> ModelSpec:
    """Look a model up by alias or Hugging Face repo id (case-insensitive)."""
    models = load_models()
    wanted = name.strip().lower()
    for spec in models.values():
        if wanted in (spec.alias.lower(), spec.hf_repo.lower()):
            return spec
    raise unknown_name_error("model", name, models)


def resolve_alias(name: str) -> str | None:
    """Hugging Face repo id for a catalog alias such as 'qwen2.5:0.5b'; None if `name` is not one."""
    spec = load_models().get(name.strip().lower())
    return spec.hf_repo if spec else None
