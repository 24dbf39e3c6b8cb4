"""A model reference -> the ModelSpec the planner plans with, without downloading anything.

In order: a catalog alias ('llama3.1:8b'); a Hub id of a catalog entry, its checkpoint
or its base model ('meta-llama/Llama-3.1-8B'); the embedded demo model; a local folder
with a config.json; a Hub id whose config.json is already in the local Hugging Face
cache (looked up offline). Anything else is one error that says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from selfhost.catalog.hf_config import model_from_config_file
from selfhost.catalog.models import ModelSpec, find_model, load_models
from selfhost.catalog.names import unknown_name_error
from selfhost.errors import ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _cached_config(repo_id: str) -> Path | None:
    """config.json of `repo_id` in the local Hugging Face cache (main revision); None if absent."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def resolve_model_spec(ref: str) -> ModelSpec:
    """The ModelSpec for `ref`: catalog entry, or one computed from a config.json on this machine."""
    from selfhost.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME

    spec = find_model(ref)
    if spec is not None:
        return spec
    if ref.strip() in ("default", EMBEDDED_MODEL_NAME):
        return model_from_config_file(EMBEDDED_MODEL_DIR / "config.json", EMBEDDED_MODEL_NAME)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{ref} is a folder but has no config.json; expected a Hugging Face checkpoint")
        name = EMBEDDED_MODEL_NAME if path.resolve() == EMBEDDED_MODEL_DIR.resolve() else ref
        return model_from_config_file(path / "config.json", name)
    if _HUB_ID.match(ref.strip()):
        config = _cached_config(ref.strip())
        if config is not None:
            return model_from_config_file(config, ref.strip())
        raise ModelNotFoundError(
            f"{ref!r} is not in the model catalog and its config.json is not in the local Hugging Face cache; "
            f"the planner never downloads: fetch it with `huggingface-cli download {ref.strip()} config.json` "
            "(or `selfhost run` it once), pass a checkpoint folder, or pick a catalog alias (`selfhost models`)"
        )
    if ref.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"folder {ref} does not exist; expected a Hugging Face checkpoint folder")
    raise unknown_name_error("model", ref, load_models())
