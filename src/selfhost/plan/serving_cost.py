"""A model on a device -> what its tokens cost: the speed it serves at and the device's cost.

`selfhost cost` and the gateway's prices for local models both start here, so an
answer from a local model is charged what `selfhost cost` says its tokens cost.
The speed is measured (a benchmark result file, or tokens/s the operator gives)
or estimated by `selfhost fit`; the cost is the catalog device's purchase price
amortised plus power, or its rent, each overridable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfhost.catalog.devices import DeviceSpec
from selfhost.catalog.models import ModelSpec
from selfhost.errors import InvalidParameterError
from selfhost.plan.bench_result import measured_model_matches, read_bench_result
from selfhost.plan.cost import SelfHostSetup
from selfhost.plan.fit import FitReport
from selfhost.plan.precision import Precision


@dataclass(frozen=True)
class ServingSpeed:
    """Tokens/s the device completes when busy: generated ones (decode) and prompt ones (prefill)."""

    decode_tok_s: float
    prefill_tok_s: float
    source: str  # "estimated by fit", "measured (FILE)", ...

    def mix_tok_s(self, output_share: float) -> float:
        """Tokens/s over a workload whose `output_share` is generated: each kind at its own speed."""
        return 1 / (output_share / self.decode_tok_s + (1 - output_share) / self.prefill_tok_s)


def serving_speed(spec: ModelSpec, report: FitReport, precision: Precision, bench_result: Path | None = None,
                  any_bench_model: bool = False) -> ServingSpeed:
    """Measured speeds from `bench_result` (prefill estimated where it has none), else fit's estimate; a fit
    estimate of a model that does not fit the device is an error."""
    estimate = ServingSpeed(report.speed.decode_tok_s, report.speed.prefill_tok_s, "estimated by fit")
    if bench_result is None:
        if not report.fits:
            raise InvalidParameterError(
                f"{spec.alias} at {precision.name} needs {report.memory.total_bytes / 1e9:,.1f} GB with context "
                f"{report.request.context:,} x {report.request.concurrency}; {report.request.device.name} has "
                f"{report.request.device.usable_bytes / 1e9:,.1f} GB usable. Try int4 (--quant), a smaller context or "
                "concurrency, or a bigger device"
            )
        return estimate
    measured = read_bench_result(bench_result)
    if measured.model is not None and not any_bench_model and not measured_model_matches(measured.model, spec):
        raise InvalidParameterError(
            f"{bench_result} measured model {measured.model!r}, not {spec.alias}: benchmark {spec.alias} "
            "(or pass --any-bench-model to cost it with this throughput anyway)"
        )
    source = f"measured ({bench_result})" if measured.model is not None else \
        f"measured ({bench_result}, which names no model)"
    return ServingSpeed(measured.output_tok_s, measured.prompt_tok_s or estimate.prefill_tok_s, source)


def device_setup(dev: DeviceSpec, throughput_tok_s: float, price_usd: float | None = None,
                 rent_usd_per_hour: float | None = None, power_w: float | None = None, amortisation_years: float = 3.0,
                 electricity_usd_per_kwh: float = 0.15) -> SelfHostSetup:
    """The device bought (its catalog price unless `price_usd`) or rented (`rent_usd_per_hour`, or the catalog's
    rent where it lists no price), at `throughput_tok_s`."""
    if price_usd is not None and rent_usd_per_hour is not None:
        raise InvalidParameterError("give a purchase price (--price, price_usd) or an hourly rent (--rent, "
                                    "rent_usd_per_hour), not both")
    if rent_usd_per_hour is None and price_usd is None and dev.price_usd is None and dev.rent_usd_per_hour is None:
        raise InvalidParameterError(f"{dev.name} has no price or rent in the catalog; give a price (--price, "
                                    "price_usd) or a rent (--rent, rent_usd_per_hour)")
    renting = rent_usd_per_hour is not None or (price_usd is None and dev.price_usd is None)
    return SelfHostSetup(
        device_name=dev.name, throughput_tok_s=throughput_tok_s,
        power_w=power_w if power_w is not None else dev.power_w,
        price_usd=None if renting else (price_usd if price_usd is not None else dev.price_usd),
        rent_usd_per_hour=(rent_usd_per_hour if rent_usd_per_hour is not None else dev.rent_usd_per_hour)
        if renting else None,
        amortisation_years=amortisation_years, electricity_usd_per_kwh=electricity_usd_per_kwh,
    )
