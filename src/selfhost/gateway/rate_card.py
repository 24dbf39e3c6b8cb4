"""A deployment's prices, worked out once: what each kind of token costs, so a request is a few products.

`plan.pricing.price_usage` runs genai-prices' unit registry on every call (~0.3 ms on
the 2-core VM, about a third of the gateway's own CPU per request). For a price without
prompt-length tiers the cost is linear in the token counts, so a card asks genai-prices
once, per price in force, what one fresh, cached and cache-written prompt token and one
output token cost on top of the per-request fee, and each request is then priced from
those. Tiered prices, and any price the card cannot read, go through genai-prices every
time. Both sides are Decimal arithmetic that never rounds, so the two agree to the last
digit (the tests compare them over the whole catalog).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from selfhost.catalog.prices import ApiModel, at_pricing_time, load_price_catalog
from selfhost.plan.pricing import Cost, Unpriced, UsageRecord, price_usage

MAX_CARDS = 64  # prices in force kept per deployment (a price changes by date or time of day)


@dataclass(frozen=True)
class RateCard:
    """Dollars per token of each kind, and per request, under one price."""

    fee_input_usd: Decimal  # the per-request part that genai-prices files under input / output / neither
    fee_output_usd: Decimal
    fee_other_usd: Decimal
    fresh_input_usd: Decimal  # one prompt token neither cached nor written to the cache
    cached_input_usd: Decimal
    cache_write_usd: Decimal
    output_usd: Decimal  # one output or reasoning token

    def cost(self, usage: UsageRecord, model: ApiModel, when: dt.datetime) -> Cost:
        fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        input_usd = (self.fee_input_usd + self.fresh_input_usd * fresh + self.cached_input_usd * usage.cached_input_tokens
                     + self.cache_write_usd * usage.cache_write_tokens)
        output_usd = self.fee_output_usd + self.output_usd * (usage.output_tokens + usage.reasoning_tokens)
        return Cost(model.id, self.fee_other_usd + input_usd + output_usd, input_usd, output_usd, model.as_of,
                    model.since(when), model.source)


class Pricer:
    """Prices usage under one catalog model exactly as `price_usage` does; cards are built on first use."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self._model: ApiModel | Unpriced | None = None
        # id(price in force) -> (that price, kept so its id stays its own; its card, None where it is tiered)
        self._cards: dict[int, tuple[object, RateCard | None]] = {}

    def price(self, usage: UsageRecord, when: dt.datetime) -> Cost | Unpriced:
        model = self._lookup()
        if isinstance(model, Unpriced):
            return model
        when = at_pricing_time(when)
        in_force = model.model_price(when)
        held = self._cards.get(id(in_force))
        if held is None:
            if len(self._cards) >= MAX_CARDS:
                self._cards.clear()
            held = self._cards[id(in_force)] = (in_force, _card(model, in_force, when))
        card = held[1]
        if card is None or not _whole_single_request(usage):
            return price_usage(usage, model, when)
        return card.cost(usage, model, when)

    def _lookup(self) -> ApiModel | Unpriced:
        if self._model is None:
            found = load_price_catalog().find(self.model_id)
            self._model = found if found is not None else Unpriced(self.model_id, "no price source knows this model")
        return self._model


def _whole_single_request(usage: UsageRecord) -> bool:
    counts = (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens, usage.output_tokens,
              usage.reasoning_tokens)
    return usage.requests == 1 and all(type(count) is int for count in counts)


def _card(model: ApiModel, in_force: object, when: dt.datetime) -> RateCard | None:
    """The card of a price whose every rate is a plain number; None for tiers or anything else."""
    rates = getattr(in_force, "__dict__", None)
    if not rates or any(not isinstance(rate, Decimal | None) for rate in rates.values()):
        return None

    def probe(**tokens: int) -> Cost | Unpriced:
        return price_usage(UsageRecord(**tokens), model, when)

    fee = probe()
    fresh, cached = probe(input_tokens=1), probe(input_tokens=1, cached_input_tokens=1)
    written, output = probe(input_tokens=1, cache_write_tokens=1), probe(output_tokens=1)
    if not all(cost.is_priced for cost in (fee, fresh, cached, written, output)):
        return None
    return RateCard(
        fee_input_usd=fee.input_usd, fee_output_usd=fee.output_usd,
        fee_other_usd=fee.usd - fee.input_usd - fee.output_usd,
        fresh_input_usd=fresh.input_usd - fee.input_usd, cached_input_usd=cached.input_usd - fee.input_usd,
        cache_write_usd=written.input_usd - fee.input_usd, output_usd=output.output_usd - fee.output_usd)
