"""Licence terms an operator must act on (user ceilings, use policies, commercial use)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from selfhost.catalog._data import read_data
from selfhost.catalog.names import unknown_name_error


@dataclass(frozen=True)
class Licence:
    id: str
    name: str
    url: str
    commercial_use: bool
    sources: tuple[str, ...]
    max_monthly_users: int | None = None
    use_policy: str | None = None
    attribution: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.max_monthly_users is not None and self.max_monthly_users <= 0:
            raise ValueError(f"licence {self.id}: max_monthly_users must be > 0, got {self.max_monthly_users}")
        if not self.sources:
            raise ValueError(f"licence {self.id}: needs at least one source")


@cache
def load_licences() -> dict[str, Licence]:
    licences = {}
    for key, row in read_data("licences.toml").items():
        row = dict(row)
        row.pop("retrieved")
        licences[key] = Licence(id=key, sources=tuple(row.pop("sources")), **row)
    return licences


def get_licence(licence_id: str) -> Licence:
    licences = load_licences()
    if licence_id not in licences:
        raise unknown_name_error("licence", licence_id, licences)
    return licences[licence_id]
