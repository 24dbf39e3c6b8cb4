"""Model references -> a folder on disk holding config.json, weights and tokenizer.

A reference is a local folder, a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`),
a catalog alias (`qwen2.5:0.5b`), or nothing at all for the embedded demo model.
Hub downloads go to the standard Hugging Face cache, so a model fetched by any
other tool is reused here and vice versa.
"""

from __future__ import annotations

import re
from pathlib import Path

from selfhost.errors import ModelNotFoundError

EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "shakespeare"
EMBEDDED_MODEL_NAME = "selfhost/shakespeare"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Everything a native checkpoint needs; pickled weights only on explicit opt-in.
_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model(ref: str | None, allow_pickle: bool = False, revision: str | None = None) -> Path:
    """Return the local folder for `ref`, downloading from the Hub if needed."""
    if ref is None or ref in ("default", EMBEDDED_MODEL_NAME):
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise ModelNotFoundError(
                "the embedded demo model is not in this installation; pass a model folder or Hub id"
            )
        return EMBEDDED_MODEL_DIR
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{ref} is a folder but has no config.json; expected a Hugging Face checkpoint")
        return path
    if ref.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"folder {ref} does not exist; expected a Hugging Face checkpoint folder")
    repo_id = _alias_target(ref) or ref
    if not _HUB_ID.match(repo_id):
        raise ModelNotFoundError(
            f"model {ref!r} is neither a local folder nor a Hugging Face Hub id like 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    return _download(ref, repo_id, allow_pickle, revision)


def _alias_target(ref: str) -> str | None:
    try:
        from selfhost.catalog import resolve_alias
    except ImportError:  # the catalog is optional for loading
        return None
    return resolve_alias(ref)


def _download(ref: str, repo_id: str, allow_pickle: bool, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = _FILES + (["*.bin"] if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"could not get {ref!r} (Hub id {repo_id}) from the Hugging Face Hub or its local cache: {reason}. "
            "Check the id and your network, or pass a local folder with config.json and *.safetensors"
        ) from err
    if not any(folder.glob("*.safetensors")) and not allow_pickle:
        raise ModelNotFoundError(
            f"{repo_id} has no safetensors weights; pass --allow-pickle to download and load its pickled .bin files"
        )
    return folder
