"""What a usage record costs through a hosted API, on a date: the one function `selfhost cost` uses.

`price_usage` takes token counts, a model id and a date and returns a `Cost` (dollars,
with the price's source and date) or `Unpriced` (never $0 for a model nobody priced).
The billing rules are genai-prices' (selfhost's overrides are turned into the same
objects): cached prompt tokens at the cache-read rate, cache writes at theirs, reasoning
tokens at the output rate, per-request fees, and prompt-length tiers where crossing the
threshold reprices every token of the request. A request-level ledger (the gateway's)
calls it once per request with the request's timestamp; `price_period` spreads a
month's volume evenly over its days, so a price change mid-month splits the bill.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields, replace
from decimal import Decimal

from selfhost.catalog.prices import ApiModel, PriceCatalog, at_pricing_time, load_price_catalog
from selfhost.errors import InvalidParameterError


@dataclass(frozen=True)
class UsageRecord:
    """Tokens and requests to price. Counts may be fractional (a share of a month's volume).

    `input_tokens` counts every prompt token, the cached and cache-written ones included
    (they are a part of it, billed at their own rates). `output_tokens` counts the tokens
    the caller sees and `reasoning_tokens` the hidden ones; both are billed as output.
    With several requests, tiers apply to the average request (`input_tokens / requests`).
    """

    input_tokens: float = 0
    cached_input_tokens: float = 0
    cache_write_tokens: float = 0
    output_tokens: float = 0
    reasoning_tokens: float = 0
    requests: float = 1

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise InvalidParameterError(f"usage {item.name} must be a number >= 0, got {value!r}")
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise InvalidParameterError(
                f"cached ({self.cached_input_tokens:g}) and cache-write ({self.cache_write_tokens:g}) tokens are part "
                f"of input_tokens ({self.input_tokens:g}) and cannot exceed it")
        if self.requests == 0 and self.input_tokens + self.output_tokens + self.reasoning_tokens > 0:
            raise InvalidParameterError("usage with tokens needs requests >= 1")

    def scaled(self, factor: float) -> UsageRecord:
        """The same mix, `factor` times the volume (requests included, so tiers do not move)."""
        return replace(self, **{item.name: getattr(self, item.name) * factor for item in fields(self)})


@dataclass(frozen=True)
class Cost:
    """Dollars for a usage record, and the price they were computed from."""

    model_id: str
    usd: Decimal
    input_usd: Decimal  # prompt tokens, cached and cache-written included
    output_usd: Decimal  # output and reasoning tokens
    as_of: dt.date | None  # the day the price is known to hold; None: an undated source
    since: dt.date | None  # the day the price took effect, where the source records it
    source: str
    is_priced = True


@dataclass(frozen=True)
class Unpriced:
    """No price is known: an unknown model, or one the source lists without token prices."""

    model_id: str
    reason: str
    is_priced = False


@dataclass(frozen=True)
class PeriodCost:
    """Usage spread over days [start, end): one Cost per run of days with the same price."""

    model_id: str
    start: dt.date
    end: dt.date
    segments: tuple[tuple[dt.date, int, Cost], ...]  # (first day, number of days, cost of those days)
    is_priced = True

    @property
    def usd(self) -> Decimal:
        return sum((cost.usd for _, _, cost in self.segments), Decimal(0))

    @property
    def latest(self) -> Cost:
        return self.segments[-1][2]


def _lookup(model: str | ApiModel, catalog: PriceCatalog | None) -> ApiModel | Unpriced:
    if isinstance(model, ApiModel):
        return model
    found = (catalog or load_price_catalog()).find(model)
    return found if found is not None else Unpriced(model, "no price source knows this model")


def _cost(model: ApiModel, usage: UsageRecord, when: dt.datetime) -> Cost | Unpriced:
    from genai_prices import Usage

    price = model.model_price(when)
    if price.input_mtok is None and price.output_mtok is None:
        return Unpriced(model.id, f"{model.model} has no per-token price in {model.source}")
    if usage.requests == 0:
        zero = Decimal(0)
        return Cost(model.id, zero, zero, zero, model.as_of, model.since(when), model.source)
    # genai-prices prices one request (a per-request fee once, tiers on its prompt length):
    # price the average request and multiply.
    requests = Decimal(str(usage.requests))

    def per_request(count: float) -> Decimal:
        return Decimal(str(count)) / requests

    one = Usage(input_tokens=per_request(usage.input_tokens), cache_read_tokens=per_request(usage.cached_input_tokens),
                cache_write_tokens=per_request(usage.cache_write_tokens),
                output_tokens=per_request(usage.output_tokens + usage.reasoning_tokens))
    calc = model.info.calc_price(one, model.provider_info, genai_request_timestamp=when)
    return Cost(model.id, calc.total_price * requests, calc.input_price * requests, calc.output_price * requests,
                model.as_of, model.since(when), model.source)


def price_usage(
    usage: UsageRecord, model: str | ApiModel, when: dt.date | dt.datetime, catalog: PriceCatalog | None = None,
) -> Cost | Unpriced:
    """The cost of `usage` through `model` at the price in force `when` (a date: its noon, UTC)."""
    found = _lookup(model, catalog)
    if isinstance(found, Unpriced):
        return found
    return _cost(found, usage, at_pricing_time(when))


def price_period(
    usage: UsageRecord, model: str | ApiModel, start: dt.date, end: dt.date, catalog: PriceCatalog | None = None,
) -> PeriodCost | Unpriced:
    """The cost of `usage` spread evenly over the days from `start` up to (not including) `end`."""
    days = (end - start).days
    if days < 1:
        raise InvalidParameterError(f"a pricing period needs end after start, got {start} to {end}")
    found = _lookup(model, catalog)
    if isinstance(found, Unpriced):
        return found
    runs: list[list] = []  # [first day, number of days, price in force]
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        price = found.model_price(at_pricing_time(day))
        if runs and runs[-1][2] == price:
            runs[-1][1] += 1
        else:
            runs.append([day, 1, price])
    segments = []
    for first_day, count, _ in runs:
        cost = _cost(found, usage.scaled(count / days), at_pricing_time(first_day))
        if isinstance(cost, Unpriced):
            return cost
        segments.append((first_day, count, cost))
    return PeriodCost(found.id, start, end, tuple(segments))


def million_token_mix(output_share: float, cached_share: float, request_tokens: float) -> UsageRecord:
    """A million tokens of which `output_share` are generated and `cached_share` of the prompt is cached."""
    prompt = (1 - output_share) * 1e6
    return UsageRecord(input_tokens=prompt, cached_input_tokens=cached_share * prompt,
                       output_tokens=output_share * 1e6, requests=1e6 / request_tokens)


def month_bounds(month: str) -> tuple[dt.date, dt.date]:
    """'2026-12' -> (2026-12-01, 2027-01-01)."""
    try:
        first = dt.date.fromisoformat(f"{month}-01")
    except ValueError as exc:
        raise InvalidParameterError(f"--month must be YYYY-MM, got {month!r}") from exc
    following = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following
