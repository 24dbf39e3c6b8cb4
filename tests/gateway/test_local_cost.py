"""A local model's `[models.cost]`: its tokens priced as `selfhost cost` prices them (plan/serving_cost.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal

import pytest

from selfhost.catalog import get_device
from selfhost.gateway.config import GatewayConfigError, ModelEntry
from selfhost.gateway.local_meter import LocalRate
from selfhost.plan.pricing import UsageRecord


def rate(path: str = "llama3.1:8b", **cost) -> LocalRate:
    return LocalRate(ModelEntry(name="m", path=path, cost=cost))


def test_the_workload_mix_averages_to_the_best_case_selfhost_cost_prints():
    """`selfhost cost` says what a token costs with the device fully busy, over a 25%-output mix at fit's
    decode and prefill speeds; the gateway charges prompt tokens at prefill and output at decode speed."""
    local = rate(device="rtx4090", quant="int4", rent_usd_per_hour=100)
    printed = subprocess.run(
        [sys.executable, "-m", "selfhost.cli", "cost", "llama3.1:8b", "--device", "rtx4090", "--quant", "int4",
         "--rent", "100", "--volume", "1B", "--output-share", "0.25"], capture_output=True, text=True, check=True)
    best_case = Decimal(re.search(r"best case \$([\d,.]+)/M", printed.stdout)[1].replace(",", ""))
    mix = (Decimal("0.25") * local.usd_per_output_token + Decimal("0.75") * local.usd_per_prompt_token) * 10**6
    assert abs(mix - best_case) <= Decimal("0.0005")  # the CLI prints three decimals
    assert local.usd_per_output_token > 5 * local.usd_per_prompt_token  # decode is the slow, dear part
    priced = local.price(UsageRecord(input_tokens=1000, output_tokens=250), estimated=False).cost
    assert priced.usd == 1000 * local.usd_per_prompt_token + 250 * local.usd_per_output_token
    assert priced.source.startswith("cost model: NVIDIA GeForce RTX 4090 (24 GB) rented at $100/h; estimated by fit")


def test_a_bought_device_is_its_price_over_its_life_plus_power():
    device = get_device("rtx4090")
    local = rate(device="rtx4090", throughput_tok_s=50, amortisation_years=2, electricity_usd_per_kwh=0.3)
    per_second = (Decimal(repr(device.price_usd)) / (2 * 12 * 730 * 3600)
                  + Decimal(repr(device.power_w)) / 1000 / 3600 * Decimal("0.3"))
    assert local.usd_per_prompt_token == local.usd_per_output_token == per_second / 50
    # Rented, no catalog device: the rent alone, exactly.
    rented = rate(rent_usd_per_hour=0.72, throughput_tok_s=100)
    assert rented.usd_per_output_token == Decimal("0.72") / 3600 / 100 == Decimal("0.000002")
    assert rented.describe().startswith("local m: $2 per million prompt tokens, $2 per million generated (cost model:")


def test_measured_speeds_from_a_benchmark_result(tmp_path):
    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"schema": "selfhost.bench.throughput/1", "model": "llama3.1:8b",
                                  "output_tok_s": 40.0, "prompt_tok_s": 400.0}))
    local = rate(device="rtx4090", quant="int4", rent_usd_per_hour=1.8, bench_result=str(result))
    assert local.usd_per_output_token == Decimal("0.0005") / 40 and local.usd_per_prompt_token == Decimal("0.0005") / 400
    assert "measured (" in local.source
    with pytest.raises(GatewayConfigError, match="model 'm': \\[models.cost\\]: .*measured model 'llama3.1:8b', not "):
        rate(path="qwen2.5:7b", device="rtx4090", rent_usd_per_hour=1.8, bench_result=str(result))


@pytest.mark.parametrize("cost, message", [
    ({"device": "rtx9999"}, "rtx9999"),
    ({"device": "rtx4090", "quant": "fp5"}, "fp5"),
    ({"device": "rtx4090", "quant": "fp16", "context": 131072, "concurrency": 64}, "GB usable"),
])
def test_bad_cost_is_one_error_naming_the_model(cost, message):
    with pytest.raises(GatewayConfigError, match="model 'm': \\[models.cost\\]: ") as err:
        rate(path="llama3.1:70b", **cost)
    assert message in str(err.value)


def test_without_cost_the_answers_are_unpriced():
    local = LocalRate(ModelEntry(name="m", path="/m"))
    cost = local.price(UsageRecord(input_tokens=3, output_tokens=2), estimated=False).cost
    assert not cost.is_priced and "no [models.cost]" in cost.reason
    assert local.describe() == "local m: unpriced (no [models.cost])"
