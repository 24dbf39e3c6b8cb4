"""A deployment's rate card prices every request exactly as plan.pricing.price_usage (genai-prices) does."""

from __future__ import annotations

import datetime as dt
import random

from selfhost.catalog.prices import load_price_catalog
from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.usage import usd_text
from selfhost.plan.pricing import UsageRecord, price_usage


def usages(rng: random.Random, count: int) -> list[UsageRecord]:
    out = [UsageRecord(), UsageRecord(input_tokens=1000, cached_input_tokens=200, output_tokens=50, reasoning_tokens=30)]
    for _ in range(count):
        prompt = rng.choice([1, 7, 999, rng.randint(0, 300_000)])  # past the 200k tiers some models have
        cached = rng.randint(0, prompt)
        written = rng.randint(0, prompt - cached)
        out.append(UsageRecord(input_tokens=prompt, cached_input_tokens=cached, cache_write_tokens=written,
                               output_tokens=rng.randint(0, 40_000), reasoning_tokens=rng.randint(0, 5_000)))
    return out


def test_every_catalog_model_prices_as_genai_prices_does():
    rng = random.Random(16)
    when = dt.datetime(2026, 12, 6, 15, 0, tzinfo=dt.UTC)
    models = load_price_catalog().models()
    assert len(models) > 100
    for model in models:
        pricer = Pricer(model.id)
        for usage in usages(rng, 3):
            want, got = price_usage(usage, model.id, when), pricer.price(usage, when)
            assert got.is_priced == want.is_priced, model.id
            if want.is_priced:
                assert (got.usd, got.input_usd, got.output_usd) == (want.usd, want.input_usd, want.output_usd), (
                    model.id, usage)
                assert (got.model_id, got.as_of, got.since, got.source) == (want.model_id, want.as_of, want.since,
                                                                            want.source)
            else:
                assert got.reason == want.reason


def test_fractional_and_multi_request_usage_take_the_catalog_path():
    when = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    for usage in (UsageRecord(input_tokens=10.5, output_tokens=3), UsageRecord(input_tokens=1000, requests=4)):
        assert Pricer("gpt-4o-mini").price(usage, when).usd == price_usage(usage, "gpt-4o-mini", when).usd


def test_unknown_model_is_unpriced_never_zero():
    cost = Pricer("no-such-model-anywhere").price(UsageRecord(input_tokens=5), dt.datetime.now(dt.UTC))
    assert not cost.is_priced and "no price source" in cost.reason


def test_dollars_as_text_are_exact_without_trailing_zeros():
    from decimal import Decimal

    assert usd_text(Decimal("0.17064000")) == "0.17064"
    assert usd_text(Decimal("120.00")) == "120"
    assert usd_text(Decimal("0.0000018")) == "0.0000018"
    assert usd_text(Decimal(0)) == "0"
