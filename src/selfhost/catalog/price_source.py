"""The maintained price database behind `selfhost prices` and `selfhost cost`: pydantic's genai-prices.

genai-prices (https://github.com/pydantic/genai-prices) models what a two-number table
cannot: cached-input and cache-write rates, prompt-length tiers, per-request fees and
dated price changes, for every major API and the hosts of open models. selfhost reads
the snapshot bundled with the installed package, or a newer one that
`selfhost prices --update` fetched into the cache folder; nothing here touches the
network unless `fetch_snapshot` is called.

A snapshot's date is the day its prices are known to hold: the PyPI release date of the
bundled version (recorded in data/api_prices.toml, since the wheel carries none), or the
day a newer snapshot was fetched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from selfhost.catalog._data import read_data
from selfhost.errors import SelfhostError

# genai-prices' own update URL (genai_prices.update_prices.DEFAULT_UPDATE_URL), named
# here so the price module imports nothing heavy until prices are needed.
UPDATE_URL = "https://raw.githubusercontent.com/pydantic/genai-prices/refs/heads/main/prices/new_data/v2/data.json"
UPDATE_URL_ENV = "SELFHOST_PRICES_URL"


class PriceUpdateError(SelfhostError):
    """`selfhost prices --update` could not fetch or read a newer snapshot."""


@dataclass(frozen=True)
class PriceSnapshot:
    """Providers and their models, as genai-prices objects, with the date the data holds for."""

    providers: tuple[Any, ...]  # genai_prices.types.Provider
    as_of: dt.date | None  # None: a bundled version whose release date selfhost has not recorded
    label: str  # "genai-prices 0.2.5" or "genai-prices data fetched from <url>"


def cache_path() -> Path:
    """Where `--update` keeps the fetched snapshot (XDG_CACHE_HOME/selfhost, else ~/.cache/selfhost)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "selfhost" / "genai-prices.json"


def bundled_snapshot() -> PriceSnapshot:
    from genai_prices.data import providers

    version = installed_version("genai-prices")
    released = read_data("api_prices.toml")["genai_prices"]["released"]
    return PriceSnapshot(tuple(providers), released.get(version), f"genai-prices {version}")


def _read_fetched(path: Path) -> PriceSnapshot:
    # The only way genai-prices offers to turn its JSON into objects is the helper its own
    # updater uses; it is private, so this one call is pinned by the version range in
    # pyproject.toml and exercised by tests/catalog/test_prices.py.
    from genai_prices.types import _providers_from_raw

    saved = json.loads(path.read_text())
    providers = _providers_from_raw(saved["providers"])
    return PriceSnapshot(tuple(providers), dt.date.fromisoformat(saved["fetched"]),
                         f"genai-prices data fetched from {saved['url']}")


@cache
def current_snapshot() -> PriceSnapshot:
    """The newest of the bundled snapshot and the fetched one, if any (offline: reads files only)."""
    bundled = bundled_snapshot()
    path = cache_path()
    if not path.exists():
        return bundled
    try:
        fetched = _read_fetched(path)
    except (ValueError, KeyError, TypeError) as exc:  # a corrupt or incompatible cache file: say so, don't use it
        raise PriceUpdateError(f"cannot read the fetched prices in {path} ({exc}); delete it or run "
                               "`selfhost prices --update` again") from exc
    if bundled.as_of is not None and bundled.as_of > fetched.as_of:
        return bundled
    return fetched


def fetch_snapshot(url: str | None = None, timeout_s: float = 15.0, today: dt.date | None = None) -> PriceSnapshot:
    """Download genai-prices' current data, check it parses, and keep it in the cache folder."""
    import httpx2
    from genai_prices.types import _providers_from_raw

    url = url or os.environ.get(UPDATE_URL_ENV) or UPDATE_URL
    fallback = bundled_snapshot()
    still_using = f"still using {fallback.label}" + (f" of {fallback.as_of}" if fallback.as_of else "")
    try:
        response = httpx2.get(url, timeout=timeout_s, follow_redirects=True)
        response.raise_for_status()
        raw = json.loads(response.content)
    except httpx2.HTTPError as exc:
        raise PriceUpdateError(f"cannot fetch newer prices from {url} ({type(exc).__name__}: {exc}); "
                               f"{still_using}") from exc
    except ValueError as exc:
        raise PriceUpdateError(f"{url} did not return JSON ({exc}); {still_using}") from exc
    if not isinstance(raw, list):
        raise PriceUpdateError(f"{url} returned {type(raw).__name__}, not a list of providers; {still_using}")
    try:
        providers = _providers_from_raw(raw)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise PriceUpdateError(f"{url} returned data genai-prices cannot read ({exc}); {still_using}") from exc
    fetched = today or dt.date.today()
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fetched": fetched.isoformat(), "url": url, "providers": raw}))
    current_snapshot.cache_clear()
    return PriceSnapshot(tuple(providers), fetched, f"genai-prices data fetched from {url}")
