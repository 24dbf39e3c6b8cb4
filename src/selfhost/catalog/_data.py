"""Read the catalog's TOML data files shipped inside the package."""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources


@cache
def read_data(file_name: str) -> dict:
    """Parse `catalog/data/<file_name>` once per process."""
    text = resources.files("selfhost.catalog").joinpath("data", file_name).read_bytes()
    return tomllib.loads(text.decode("utf-8"))
