"""Every hosted model selfhost can price: genai-prices' snapshot plus selfhost's own overrides.

A model's id is `provider/model` as genai-prices spells them (`openai/gpt-4o`,
`groq/llama-3.1-8b-instant`, `openrouter/meta-llama/llama-3.1-8b-instruct`); a bare
model name (`gpt-4o`, `claude-sonnet-4-5`) is matched the way genai-prices matches the
names APIs report, dated variants included. Entries in data/api_prices.toml (and in the
file named by $SELFHOST_API_PRICES, for an operator's negotiated rates) replace the
source's entry of the same id or add one it lacks; each carries its own source and date.

Import-light like the rest of the catalog: genai-prices loads on first use.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from selfhost.catalog._data import read_data
from selfhost.catalog.price_source import PriceSnapshot, current_snapshot
from selfhost.errors import InvalidParameterError

OVERRIDES_ENV = "SELFHOST_API_PRICES"
# A date without a time of day is priced at noon UTC: inside every provider's standard
# hours (DeepSeek's off-peak discount runs 16:30-00:30 UTC).
PRICING_TIME = dt.time(12, 0, tzinfo=dt.UTC)


def at_pricing_time(day: dt.date | dt.datetime) -> dt.datetime:
    if isinstance(day, dt.datetime):
        return day if day.tzinfo else day.replace(tzinfo=dt.UTC)
    return dt.datetime.combine(day, PRICING_TIME)


@dataclass(frozen=True)
class RateSummary:
    """The per-token rates of one model on one day, in US$ per million tokens (None: not offered)."""

    input_usd_per_m: float | None
    cached_input_usd_per_m: float | None
    cache_write_usd_per_m: float | None
    output_usd_per_m: float | None
    usd_per_request: float | None
    long_context_from_tokens: int | None  # prompts longer than this pay the long-context rates on every token
    long_context_input_usd_per_m: float | None
    long_context_output_usd_per_m: float | None


@dataclass(frozen=True)
class ApiModel:
    """One model at one provider, with its price history and where the prices come from."""

    id: str
    provider: str  # display name, e.g. "OpenAI"
    model: str  # display name, e.g. "gpt 4o"
    as_of: dt.date | None  # the day the prices are known to hold; None: undated
    source: str
    is_override: bool
    deprecated: bool
    info: Any = field(repr=False, compare=False)  # genai_prices.types.ModelInfo
    provider_info: Any = field(repr=False, compare=False)  # genai_prices.types.Provider

    def model_price(self, when: dt.datetime) -> Any:
        """genai-prices' ModelPrice in force at `when` (the last dated change on or before it)."""
        return self.info.get_prices(when)

    def _change_dates(self) -> list[dt.date]:
        if not isinstance(self.info.prices, list):
            return []
        return sorted(p.constraint.start_date for p in self.info.prices
                      if p.constraint is not None and hasattr(p.constraint, "start_date"))

    def since(self, when: dt.datetime) -> dt.date | None:
        """The date the price in force at `when` took effect, when the source records it."""
        earlier = [day for day in self._change_dates() if day <= when.date()]
        return earlier[-1] if earlier else None

    def next_change(self, when: dt.datetime) -> dt.date | None:
        """The next announced price change after `when`, if the source lists one."""
        later = [day for day in self._change_dates() if day > when.date()]
        return later[0] if later else None

    def rates(self, when: dt.datetime) -> RateSummary:
        from genai_prices.types import TieredPrices

        price = self.model_price(when)

        def base(value: Any) -> float | None:
            if value is None:
                return None
            return float(value.base if isinstance(value, TieredPrices) else value)

        def first_tier(value: Any) -> tuple[int, float] | None:
            if isinstance(value, TieredPrices) and value.tiers:
                return value.tiers[0].start, float(value.tiers[0].price)
            return None

        input_tier, output_tier = first_tier(price.input_mtok), first_tier(price.output_mtok)
        tier_start = (input_tier or output_tier or (None, None))[0]
        requests = price.requests_kcount
        return RateSummary(
            input_usd_per_m=base(price.input_mtok), cached_input_usd_per_m=base(price.cache_read_mtok),
            cache_write_usd_per_m=base(price.cache_write_mtok), output_usd_per_m=base(price.output_mtok),
            usd_per_request=float(requests) / 1000 if requests is not None else None,
            long_context_from_tokens=tier_start,
            long_context_input_usd_per_m=input_tier[1] if input_tier else None,
            long_context_output_usd_per_m=output_tier[1] if output_tier else None,
        )


def _decimal(entry: dict, key: str) -> Decimal | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value < 0:
        raise InvalidParameterError(f"API price {entry.get('id')!r}: {key} must be a number >= 0, got {value!r}")
    return Decimal(str(value))


def _override(entry: dict, providers: dict[str, Any], origin: str) -> ApiModel:
    """An api_prices.toml entry as a genai-prices model, so it is billed by the same rules."""
    from genai_prices.types import ClauseEquals, ModelInfo, ModelPrice, Provider, Tier, TieredPrices

    missing = [key for key in ("id", "provider", "model", "input_usd_per_m", "output_usd_per_m", "as_of", "source")
               if key not in entry]
    if missing:
        raise InvalidParameterError(f"API price {entry.get('id')!r} in {origin} lacks {', '.join(missing)}")
    price_id = entry["id"]
    if "/" not in price_id:
        raise InvalidParameterError(f"API price id {price_id!r} in {origin} must be provider/model")
    provider_id, model_id = price_id.split("/", 1)

    def tiered(base_key: str, long_key: str) -> Decimal | TieredPrices | None:
        base, long = _decimal(entry, base_key), _decimal(entry, long_key)
        if long is None or base is None:
            return base
        return TieredPrices(base=base, tiers=[Tier(start=int(entry["long_context_from_tokens"]), price=long)])

    if any(key.startswith("long_context_") for key in entry) and "long_context_from_tokens" not in entry:
        raise InvalidParameterError(f"API price {price_id!r} in {origin}: long-context rates need long_context_from_tokens")
    per_request = _decimal(entry, "usd_per_request")
    price = ModelPrice(
        input_mtok=tiered("input_usd_per_m", "long_context_input_usd_per_m"),
        cache_read_mtok=tiered("cached_input_usd_per_m", "long_context_cached_input_usd_per_m"),
        cache_write_mtok=_decimal(entry, "cache_write_usd_per_m"),
        output_mtok=tiered("output_usd_per_m", "long_context_output_usd_per_m"),
        requests_kcount=per_request * 1000 if per_request is not None else None,
    )
    info = ModelInfo(id=model_id, match=ClauseEquals(equals=model_id), name=entry["model"], prices=price)
    provider_info = providers.get(provider_id) or Provider(id=provider_id, name=entry["provider"], api_pattern="")
    return ApiModel(price_id, entry["provider"], entry["model"], entry["as_of"], entry["source"], True, False,
                    info, provider_info)


def _source_model(provider: Any, info: Any, snapshot: PriceSnapshot) -> ApiModel:
    page = (provider.pricing_urls or [""])[0]
    return ApiModel(f"{provider.id}/{info.id}", provider.name, info.name or info.id, snapshot.as_of,
                    f"{snapshot.label}: {page}" if page else snapshot.label, False, bool(info.deprecated),
                    info, provider)


class PriceCatalog:
    """Resolve model ids to ApiModels: overrides first, then the genai-prices snapshot."""

    def __init__(self, snapshot: PriceSnapshot, override_entries: list[tuple[dict, str]]):
        from genai_prices.data_snapshot import DataSnapshot

        self.snapshot = snapshot
        self._lookup = DataSnapshot(providers=list(snapshot.providers), from_auto_update=False)
        by_id = {provider.id: provider for provider in snapshot.providers}
        # Ids as `selfhost prices` lists them; genai-prices' own matching (below) is for the
        # names APIs report, which for some hosts differ (Fireworks: accounts/fireworks/models/...).
        self._listed = {f"{provider.id}/{info.id}".lower(): (provider, info)
                        for provider in snapshot.providers for info in provider.models}
        self.overrides = {}
        for entry, origin in override_entries:
            model = _override(entry, by_id, origin)
            self.overrides[model.id.lower()] = model

    def models(self) -> list[ApiModel]:
        """Every priced model: the source's, with overridden ids replaced, then the additions."""
        listed, seen = [], set()
        for provider in self.snapshot.providers:
            for info in provider.models:
                model_id = f"{provider.id}/{info.id}".lower()
                seen.add(model_id)
                listed.append(self.overrides.get(model_id) or _source_model(provider, info, self.snapshot))
        listed += [model for model_id, model in self.overrides.items() if model_id not in seen]
        return listed

    def find(self, name: str) -> ApiModel | None:
        """The model `name` refers to, or None when neither the overrides nor the source know it."""
        key = name.strip().lower()
        if key in self.overrides:
            return self.overrides[key]
        if key in self._listed:
            return _source_model(*self._listed[key], self.snapshot)
        provider_id, _, model_ref = key.partition("/")
        known_provider = model_ref and any(p.id == provider_id for p in self.snapshot.providers)
        try:
            if known_provider:
                provider, info = self._lookup.find_provider_model(model_ref, None, provider_id, None)
            else:
                provider, info = self._lookup.find_provider_model(key, None, None, None)
        except LookupError:
            return None
        model_id = f"{provider.id}/{info.id}".lower()
        return self.overrides.get(model_id) or _source_model(provider, info, self.snapshot)

    def get(self, name: str) -> ApiModel:
        """Like find, but an unknown name is an error that suggests the closest ids."""
        model = self.find(name)
        if model is not None:
            return model
        ids = [m.id for m in self.models()]
        # Close matches among full ids and bare model names, each suggested as the full id
        # (a bare name may be one genai-prices' matching does not take). The whole list
        # (thousands) is what `selfhost prices` is for, not an error message.
        spelled = {i.split("/", 1)[1].lower(): i for i in reversed(ids)} | {i.lower(): i for i in ids}
        close = difflib.get_close_matches(name.strip().lower(), list(spelled), n=3, cutoff=0.6)
        # A bare name is suggested as the id genai-prices resolves it to (gpt-4o: openai's,
        # not a reseller's), else as the first provider listing it.
        suggestions = list(dict.fromkeys(getattr(self.find(c), "id", None) or spelled[c] for c in close))
        hint = ("did you mean " + ", ".join(map(repr, suggestions)) + "?") if close else (
            "list the known ids with `selfhost prices --model PART`")
        raise InvalidParameterError(f"unknown API model {name!r}; {hint}")


def _override_entries() -> list[tuple[dict, str]]:
    entries = [(row, "api_prices.toml") for row in read_data("api_prices.toml").get("price", [])]
    user_file = os.environ.get(OVERRIDES_ENV)
    if user_file:
        path = Path(user_file)
        try:
            rows = tomllib.loads(path.read_text()).get("price", [])
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParameterError(f"${OVERRIDES_ENV}={user_file}: cannot read it as TOML ({exc})") from exc
        entries += [(row, str(path)) for row in rows]
    return entries


@cache
def load_price_catalog() -> PriceCatalog:
    """The catalog for this process: the newest snapshot on disk plus every override table."""
    return PriceCatalog(current_snapshot(), _override_entries())


def default_comparison_ids() -> list[str]:
    """The APIs `selfhost cost` compares against when no --api is given (data/api_prices.toml)."""
    return list(read_data("api_prices.toml")["comparison"]["default"])
