import pytest

from selfhost.errors import InvalidParameterError
from selfhost.plan.cost import HOURS_PER_MONTH, CostComparison, SelfHostSetup


def bought(**kw):
    args = dict(device_name="box", throughput_tok_s=100.0, power_w=300.0, price_usd=3600.0,
                amortisation_years=3.0, electricity_usd_per_kwh=0.2)
    args.update(kw)
    return SelfHostSetup(**args)


def test_crossover_is_where_the_curves_meet():
    comparison = CostComparison(bought(), "api", api_usd_per_m_tokens=5.0)
    crossover = comparison.crossover_tokens_per_month
    # F = 3600 / 36 = $100/month; e = 0.3 kW / 360,000 tok/h x $0.2
    setup = comparison.setup
    assert setup.fixed_usd_per_month == pytest.approx(100.0)
    assert crossover == pytest.approx(100.0 / (5e-6 - setup.energy_usd_per_token))
    assert setup.monthly_usd(crossover) == pytest.approx(comparison.api_monthly_usd(crossover))
    assert setup.monthly_usd(crossover * 0.9) > comparison.api_monthly_usd(crossover * 0.9)
    assert setup.monthly_usd(crossover * 1.1) < comparison.api_monthly_usd(crossover * 1.1)


def test_break_even_month():
    comparison = CostComparison(bought(), "api", api_usd_per_m_tokens=5.0)
    volume = 100e6
    saving = comparison.api_monthly_usd(volume) - comparison.setup.energy_usd_per_token * volume
    assert comparison.break_even_months(volume) == pytest.approx(3600.0 / saving)


def test_zero_volume_is_explained():
    comparison = CostComparison(bought(), "api", 5.0)
    assert comparison.api_monthly_usd(0) == 0
    assert comparison.setup.monthly_usd(0) == pytest.approx(100.0)
    assert comparison.setup.usd_per_m_tokens(0) is None
    assert comparison.break_even_months(0) is None
    assert any("zero volume" in note for note in comparison.explain(0))


def test_free_hardware_wins_from_the_first_token():
    comparison = CostComparison(bought(price_usd=0.0), "api", 5.0)
    assert comparison.crossover_tokens_per_month == 0
    assert comparison.break_even_months(1e6) == 0
    assert any("free" in note for note in comparison.explain(1e6))


def test_throughput_too_low_needs_more_devices_or_never_wins():
    slow = bought(throughput_tok_s=1.0)  # 2.6M tokens/month per device
    comparison = CostComparison(slow, "cheap api", api_usd_per_m_tokens=0.5)
    assert slow.capacity_tokens_per_month == pytest.approx(3600 * HOURS_PER_MONTH)
    assert slow.devices_needed(1e9) == 381
    assert comparison.crossover_tokens_per_month is None
    notes = " ".join(comparison.explain(1e9))
    assert "381 devices" in notes and "never beats" in notes


def test_api_cheaper_than_electricity_never_crosses():
    comparison = CostComparison(bought(power_w=100_000.0), "api", 0.01)
    assert comparison.crossover_tokens_per_month is None


def test_renting_is_a_fixed_monthly_cost():
    rented = SelfHostSetup(device_name="h100", throughput_tok_s=1000.0, rent_usd_per_hour=3.0)
    assert rented.fixed_usd_per_month == pytest.approx(3.0 * HOURS_PER_MONTH)
    assert rented.energy_usd_per_token == 0
    comparison = CostComparison(rented, "api", 5.0)
    assert comparison.crossover_tokens_per_month == pytest.approx(3.0 * HOURS_PER_MONTH / 5e-6)
    assert comparison.break_even_months(1e9) is None


@pytest.mark.parametrize("kw, match", [
    (dict(throughput_tok_s=0.0), "throughput"),
    (dict(throughput_tok_s=-5.0), "throughput"),
    (dict(price_usd=-1.0), "price_usd"),
    (dict(amortisation_years=0.0), "amortisation"),
    (dict(rent_usd_per_hour=2.0), "exactly one"),
])
def test_bad_setups_raise(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        bought(**kw)


def test_a_payback_beyond_the_hardwares_life_is_never():
    comparison = CostComparison(bought(), "api", api_usd_per_m_tokens=5.0)
    # 1 token a month saves ~$5e-6: a payback of ~10^9 months is no break-even at all.
    assert comparison.break_even_months(1) is None
    assert any("break-even never" in note for note in comparison.explain(1))
    # Paid back within the 36-month amortisation: a number.
    life_volume = 3600.0 / 36 / (5e-6 - comparison.setup.energy_usd_per_token)
    assert comparison.break_even_months(life_volume * 1.01) == pytest.approx(36 / 1.01)
    assert comparison.break_even_months(life_volume * 0.99) is None
