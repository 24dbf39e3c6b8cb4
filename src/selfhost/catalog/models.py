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
    release_date: dt.date | None  # None: not known (a model read from a config.json)
    licence: str  # an id of licences.toml; "" when not known
    params_b: float
    params_source: str
    arch: Architecture
    sources: tuple[str, ...]
    retrieved: dt.date
    active_params_b: float | None = None
    vision_params_b: float = 0.0
    notes: str = ""
    # Other Hub repos with this architecture (the base checkpoint, former names).
    base_repos: tuple[str, ...] = ()
    # The publisher's active count leaves out the input embedding table (OpenAI's gpt-oss). The planner
    # reads `active_params` either way: its FLOPs count both tables, its decode bytes only the head.
    active_params_exclude_embedding: bool = False

    def __post_init__(self) -> None:
        if self.params_b <= 0:
            raise ValueError(f"model {self.alias}: params_b must be > 0, got {self.params_b}")
        if not self.sources:
            raise ValueError(f"model {self.alias}: needs at least one source")
        if self.arch.is_moe != (self.active_params_b is not None):
            raise ValueError(f"model {self.alias}: active_params_b is required for MoE models and only for them")
        if self.active_params_exclude_embedding and self.arch.tied_embeddings:
            raise ValueError(f"model {self.alias}: a tied embedding is the head, which every token reads")

    @property
    def hub_repos(self) -> tuple[str, ...]:
        """Every Hub id this entry answers to: its checkpoint first, then its base repos."""
        return (self.hf_repo, *self.base_repos)

    @property
    def weight_params(self) -> int:
        """Parameters loaded into memory: the decoder plus any vision tower in the checkpoint."""
        return self.arch.total_params() + round(self.vision_params_b * 1e9)

    @property
    def active_params(self) -> int:
        """Parameters read per generated token (a text token never runs the vision tower)."""
        return self.arch.active_params()

    @property
    def active_params_as_published(self) -> int:
        """`active_params` counted as the publisher counts them (for checking `active_params_b`)."""
        embedding = self.arch.vocab * self.arch.hidden if self.active_params_exclude_embedding else 0
        return self.active_params - embedding


@cache
def load_models() -> dict[str, ModelSpec]:
    """All catalog models keyed by alias, in file order."""
    models: dict[str, ModelSpec] = {}
    for row in read_data("models.toml")["model"]:
        row = dict(row)
        arch = Architecture(**row.pop("arch"))
        sources, base_repos = tuple(row.pop("sources")), tuple(row.pop("base_repos", ()))
        spec = ModelSpec(arch=arch, sources=sources, base_repos=base_repos, **row)
        if spec.alias in models:
            raise ValueError(f"duplicate model alias {spec.alias!r} in models.toml")
        models[spec.alias] = spec
    return models


def find_model(name: str) -> ModelSpec | None:
    """The catalog entry for an alias or any of its Hub repos (case-insensitive); None if none."""
    wanted = name.strip().lower()
    for spec in load_models().values():
        if wanted == spec.alias.lower() or wanted in (repo.lower() for repo in spec.hub_repos):
            return spec
    return None


def get_model(name: str) -> ModelSpec:
    """Look a model up by alias or Hugging Face repo id (case-insensitive)."""
    spec = find_model(name)
    if spec is None:
        raise unknown_name_error("model", name, load_models())
    return spec


def resolve_alias(name: str) -> str | None:
    """Hugging Face repo id for a catalog alias such as 'qwen2.5:0.5b'; None if `name` is not one."""
    spec = load_models().get(name.strip().lower())
    return spec.hf_repo if spec else None
