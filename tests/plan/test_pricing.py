"""price_usage / price_period against amounts worked by hand from the providers' published rates.

Rates (US$ per million tokens) as genai-prices 0.2.5 lists them, each from the provider's
pricing page: OpenAI gpt-5 1.25 in / 0.125 cached / 10 out; Claude Sonnet 4.5 3 / 0.3 /
3.75 cache write / 15 out, and above 200K prompt tokens 6 / 0.6 / 7.5 / 22.5 on every
token; Gemini 2.5 Pro 1.25 / 0.125 / 10, above 200K 2.5 / 0.25 / 15; Groq Llama 3.1 8B
0.05 / 0.08 (no cache rate); Perplexity Sonar 1 / 1 plus $12 per 1,000 requests;
DeepSeek chat 0.27 / 1.10, off-peak (16:30-00:30 UTC) 0.135 / 0.55.
"""

import datetime as dt

import pytest

from selfhost.catalog.price_source import bundled_snapshot
from selfhost.catalog.prices import PriceCatalog, load_price_catalog
from selfhost.errors import InvalidParameterError
from selfhost.plan.pricing import UsageRecord, million_token_mix, month_bounds, price_period, price_usage

DAY = dt.date(2026, 12, 1)
M = 1_000_000


def usd(cost) -> float:
    assert cost.is_priced, cost
    return float(cost.usd)


@pytest.mark.parametrize("model, usage, expected", [
    # 6,000 uncached + 4,000 cached prompt; 1,500 visible + 2,500 reasoning tokens billed as output.
    ("openai/gpt-5", UsageRecord(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=1_500,
                                 reasoning_tokens=2_500),
     (6_000 * 1.25 + 4_000 * 0.125 + 4_000 * 10) / M),
    # 250K prompt > 200K: every token at the long-context rates, cache reads and writes too.
    ("anthropic/claude-sonnet-4-5", UsageRecord(input_tokens=250_000, cached_input_tokens=50_000,
                                                cache_write_tokens=10_000, output_tokens=2_000, reasoning_tokens=1_000),
     (190_000 * 6 + 50_000 * 0.6 + 10_000 * 7.5 + 3_000 * 22.5) / M),
    # The same model under the threshold: base rates.
    ("anthropic/claude-sonnet-4-5", UsageRecord(input_tokens=150_000, cached_input_tokens=50_000,
                                                output_tokens=3_000),
     (100_000 * 3 + 50_000 * 0.3 + 3_000 * 15) / M),
    ("google/gemini-2.5-pro", UsageRecord(input_tokens=300_000, cached_input_tokens=100_000, output_tokens=4_000),
     (200_000 * 2.5 + 100_000 * 0.25 + 4_000 * 15) / M),
    # Two requests of 150K prompt tokens each: each request is under the tier, so base rates.
    ("google/gemini-2.5-pro", UsageRecord(input_tokens=300_000, output_tokens=4_000, requests=2),
     (300_000 * 1.25 + 4_000 * 10) / M),
    # Groq has no cache rate: cached tokens pay the input rate.
    ("groq/llama-3.1-8b-instant", UsageRecord(input_tokens=2_000, cached_input_tokens=1_000, output_tokens=500),
     (2_000 * 0.05 + 500 * 0.08) / M),
    # A fee per request, ten times.
    ("perplexity/sonar", UsageRecord(input_tokens=5_000, output_tokens=2_000, requests=10),
     (5_000 * 1 + 2_000 * 1) / M + 10 * 12 / 1000),
])
def test_hand_worked_usage_records(model, usage, expected):
    cost = price_usage(usage, model, DAY)
    assert usd(cost) == pytest.approx(expected, rel=1e-12)
    assert cost.model_id == model
    assert cost.as_of == bundled_snapshot().as_of == dt.date(2026, 11, 19)
    assert cost.source.startswith("genai-prices 0.2.5: https://")


def test_input_and_output_parts_add_up_to_the_total_without_request_fees():
    cost = price_usage(UsageRecord(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=1_500,
                                   reasoning_tokens=2_500), "openai/gpt-5", DAY)
    assert float(cost.input_usd) == pytest.approx((6_000 * 1.25 + 4_000 * 0.125) / M)
    assert float(cost.output_usd) == pytest.approx(4_000 * 10 / M)
    assert cost.input_usd + cost.output_usd == cost.usd


def test_a_bare_name_prices_like_its_full_id():
    usage = UsageRecord(input_tokens=1_000, output_tokens=1_000)
    bare, full = price_usage(usage, "gpt-4o", DAY), price_usage(usage, "openai/gpt-4o", DAY)
    assert bare == full and usd(full) == pytest.approx((1_000 * 2.5 + 1_000 * 10) / M)


def test_off_peak_hours_price_at_the_off_peak_rate():
    usage = UsageRecord(input_tokens=M, output_tokens=M)
    assert usd(price_usage(usage, "deepseek/deepseek-chat", DAY)) == pytest.approx(0.27 + 1.10)  # a date: noon UTC
    evening = dt.datetime(2026, 12, 1, 18, 0, tzinfo=dt.UTC)
    assert usd(price_usage(usage, "deepseek/deepseek-chat", evening)) == pytest.approx(0.135 + 0.55)


@pytest.mark.parametrize("model", ["acme/imaginary-model-9", "gpt-99-ultra"])
def test_an_unknown_model_is_unpriced_never_zero(model):
    cost = price_usage(UsageRecord(input_tokens=1_000, output_tokens=100), model, DAY)
    assert not cost.is_priced and not hasattr(cost, "usd")
    assert cost.model_id == model and "no price source" in cost.reason


def test_a_model_listed_without_token_prices_is_unpriced():
    cost = price_usage(UsageRecord(input_tokens=1_000, output_tokens=100),
                       "openrouter/meta-llama/llama-3.1-8b-instruct:free", DAY)
    assert not cost.is_priced and "no per-token price" in cost.reason


def test_price_changes_split_a_month():
    # Mistral Large 4 (genai-prices 0.2.5): launch 0.68 in / 2.09 out; from 2026-10-20 1.36 / 4.18;
    # from 2026-10-29 0.70 / 2.10. 31M tokens each way over October is 1M a day.
    start, end = month_bounds("2026-10")
    period = price_period(UsageRecord(input_tokens=31 * M, output_tokens=31 * M, requests=31_000), "mistral/mistral-large-4",
                          start, end)
    assert [(first, days) for first, days, _ in period.segments] == [
        (dt.date(2026, 10, 1), 19), (dt.date(2026, 10, 20), 9), (dt.date(2026, 10, 29), 3)]
    expected = [19 * (0.68 + 2.09), 9 * (1.36 + 4.18), 3 * (0.70 + 2.10)]
    assert [float(cost.usd) for _, _, cost in period.segments] == pytest.approx(expected)
    assert float(period.usd) == pytest.approx(sum(expected))
    assert [cost.since for _, _, cost in period.segments] == [None, dt.date(2026, 10, 20), dt.date(2026, 10, 29)]


def test_a_change_that_drops_a_long_context_tier_splits_a_month():
    # Claude Opus 4.6 charged 10 in / 37.5 out above 200K prompt tokens until 2026-03-13, then 5 / 25 flat.
    start, end = month_bounds("2026-03")
    usage = UsageRecord(input_tokens=3_000_000, output_tokens=1_000_000, requests=10)  # 300K prompts
    period = price_period(usage, "anthropic/claude-opus-4-6", start, end)
    assert [days for _, days, _ in period.segments] == [12, 19]
    assert float(period.usd) == pytest.approx(12 / 31 * (3 * 10 + 37.5) + 19 / 31 * (3 * 5 + 25))


def test_a_period_without_a_change_is_one_segment():
    start, end = month_bounds("2026-12")
    period = price_period(UsageRecord(input_tokens=750 * M, output_tokens=250 * M, requests=M), "openai/gpt-4o",
                          start, end)
    assert len(period.segments) == 1 and float(period.usd) == pytest.approx(750 * 2.5 + 250 * 10)


def test_million_token_mix():
    usage = million_token_mix(output_share=0.25, cached_share=0.4, request_tokens=2_000)
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens, usage.requests) == (
        750_000, 300_000, 250_000, 500)


@pytest.mark.parametrize("kwargs, message", [
    ({"input_tokens": -1}, "input_tokens must be a number >= 0"),
    ({"input_tokens": 10, "cached_input_tokens": 8, "cache_write_tokens": 5}, "cannot exceed it"),
    ({"input_tokens": 10, "requests": 0}, "requests >= 1"),
    ({"output_tokens": float("nan")}, "output_tokens"),
])
def test_impossible_usage_is_refused(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        UsageRecord(**kwargs)


def test_month_bounds():
    assert month_bounds("2026-12") == (dt.date(2026, 12, 1), dt.date(2027, 1, 1))
    with pytest.raises(InvalidParameterError, match="YYYY-MM"):
        month_bounds("December")


OVERRIDES = [
    ({"id": "openai/gpt-4o", "provider": "OpenAI", "model": "GPT-4o (negotiated)", "input_usd_per_m": 2.0,
      "output_usd_per_m": 8.0, "as_of": dt.date(2026, 12, 2), "source": "https://example.com/our-contract"}, "test"),
    ({"id": "acme/acme-70b", "provider": "Acme", "model": "Acme 70B", "input_usd_per_m": 1.0,
      "cached_input_usd_per_m": 0.5, "output_usd_per_m": 3.0, "usd_per_request": 0.002,
      "long_context_from_tokens": 100_000, "long_context_input_usd_per_m": 2.0, "long_context_output_usd_per_m": 6.0,
      "as_of": dt.date(2026, 11, 30), "source": "https://example.com/acme-prices"}, "test"),
]


def test_overrides_replace_and_add_entries_with_their_own_source():
    catalog = PriceCatalog(load_price_catalog().snapshot, OVERRIDES)
    usage = UsageRecord(input_tokens=1_000, output_tokens=1_000)
    negotiated = price_usage(usage, "gpt-4o", DAY, catalog)
    assert usd(negotiated) == pytest.approx((1_000 * 2 + 1_000 * 8) / M)
    assert (negotiated.source, negotiated.as_of) == ("https://example.com/our-contract", dt.date(2026, 12, 2))
    long_prompts = UsageRecord(input_tokens=240_000, cached_input_tokens=40_000, output_tokens=2_000, requests=2)
    added = price_usage(long_prompts, "acme/acme-70b", DAY, catalog)  # 120K prompts: long-context input and output
    assert usd(added) == pytest.approx((200_000 * 2 + 40_000 * 0.5 + 2_000 * 6) / M + 2 * 0.002)
    ids = [model.id for model in catalog.models()]
    assert ids.count("openai/gpt-4o") == 1 and "acme/acme-70b" in ids


def test_an_override_missing_a_field_names_it():
    entry = {key: value for key, value in OVERRIDES[1][0].items() if key != "source"}
    with pytest.raises(InvalidParameterError, match="'acme/acme-70b' in test lacks source"):
        PriceCatalog(load_price_catalog().snapshot, [(entry, "test")])
