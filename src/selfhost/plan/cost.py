"""`selfhost cost`: self-hosting versus paying an API per token, in closed form.

Self-hosting one device costs a fixed F dollars a month (purchase amortised over
its life, or an always-on rental) plus e dollars of electricity per token; an API
costs p dollars per token. Volumes beyond one device's monthly capacity need more
devices, each adding F. Every quantity below is per month unless its name says
otherwise; token counts are prompt + generated tokens together.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal

from selfhost.errors import InvalidParameterError

HOURS_PER_MONTH = 730.0  # 8760 h / 12


@dataclass(frozen=True)
class SelfHostSetup:
    """A device serving a model at a measured or estimated throughput.

    `throughput_tok_s` is tokens (prompt and generated, in the workload's mix) the
    device completes per second when busy. Buying (`price_usd`) amortises the
    price over `amortisation_years` and pays electricity for busy hours only;
    renting (`rent_usd_per_hour`) pays for every hour, power included.
    """

    device_name: str
    throughput_tok_s: float
    power_w: float = 0.0
    price_usd: float | None = None
    rent_usd_per_hour: float | None = None
    amortisation_years: float = 3.0
    electricity_usd_per_kwh: float = 0.15

    def __post_init__(self) -> None:
        if not self.throughput_tok_s > 0:
            raise InvalidParameterError(f"throughput must be > 0 tokens/s, got {self.throughput_tok_s}")
        if (self.price_usd is None) == (self.rent_usd_per_hour is None):
            raise InvalidParameterError(
                f"{self.device_name}: give exactly one of a purchase price or an hourly rent"
            )
        for name in ("power_w", "electricity_usd_per_kwh"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("price_usd", "rent_usd_per_hour"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidParameterError(f"{name} must be >= 0, got {value}")
        if not self.amortisation_years > 0:
            raise InvalidParameterError(f"amortisation years must be > 0, got {self.amortisation_years}")

    @property
    def is_rented(self) -> bool:
        return self.rent_usd_per_hour is not None

    @property
    def amortisation_months(self) -> float:
        return self.amortisation_years * 12

    @property
    def fixed_usd_per_month(self) -> float:
        """F: what one device costs each month whether it serves or idles."""
        if self.is_rented:
            return self.rent_usd_per_hour * HOURS_PER_MONTH
        return self.price_usd / self.amortisation_months

    @property
    def energy_usd_per_token(self) -> float:
        """e: electricity for one token (zero when renting: the rent includes power)."""
        if self.is_rented:
            return 0.0
        kwh_per_token = self.power_w / 1000 / (self.throughput_tok_s * 3600)
        return kwh_per_token * self.electricity_usd_per_kwh

    @property
    def capacity_tokens_per_month(self) -> float:
        return self.throughput_tok_s * 3600 * HOURS_PER_MONTH

    def devices_needed(self, tokens_per_month: float) -> int:
        return max(1, math.ceil(tokens_per_month / self.capacity_tokens_per_month))

    def utilisation(self, tokens_per_month: float) -> float:
        """Share of the fleet's hours spent serving."""
        return tokens_per_month / (self.devices_needed(tokens_per_month) * self.capacity_tokens_per_month)

    def monthly_usd(self, tokens_per_month: float) -> float:
        return self.devices_needed(tokens_per_month) * self.fixed_usd_per_month + self.energy_usd_per_token * tokens_per_month

    def usd_per_m_tokens(self, tokens_per_month: float) -> float | None:
        """Cost per million tokens at this volume; None at zero volume (undefined)."""
        if tokens_per_month <= 0:
            return None
        return self.monthly_usd(tokens_per_month) / tokens_per_month * 1e6

    @property
    def floor_usd_per_m_tokens(self) -> float:
        """Cost per million tokens with every device fully busy: the best self-hosting can do."""
        return (self.fixed_usd_per_month / self.capacity_tokens_per_month + self.energy_usd_per_token) * 1e6

    @property
    def usd_per_busy_second(self) -> Decimal:
        """One second of the device's work when it is fully busy: the fixed cost spread over every second of
        its life or rental, plus the power it draws when bought. A token that takes 1/throughput seconds costs
        the floor. In Decimal from the inputs as written (28 digits), not binary floats: the gateway prices with it."""
        def exact(value: float) -> Decimal:
            return Decimal(repr(value))

        if self.is_rented:
            return exact(self.rent_usd_per_hour) / 3600
        life_s = exact(self.amortisation_years) * 12 * exact(HOURS_PER_MONTH) * 3600
        return exact(self.price_usd) / life_s + exact(self.power_w) / 1000 / 3600 * exact(self.electricity_usd_per_kwh)


@dataclass(frozen=True)
class CostComparison:
    setup: SelfHostSetup
    api_name: str
    api_usd_per_m_tokens: float  # blended over the prompt/generated mix
    price_as_of: dt.date | None = None  # the day the API price is known to hold
    price_source: str = ""

    def __post_init__(self) -> None:
        if self.api_usd_per_m_tokens < 0:
            raise InvalidParameterError(f"API price must be >= 0, got {self.api_usd_per_m_tokens}")

    @property
    def _api_usd_per_token(self) -> float:
        return self.api_usd_per_m_tokens / 1e6

    def api_monthly_usd(self, tokens_per_month: float) -> float:
        return self._api_usd_per_token * tokens_per_month

    @property
    def crossover_tokens_per_month(self) -> float | None:
        """Smallest monthly volume above which one self-hosted device is cheaper.

        Solves F + e*V = p*V: V* = F / (p - e). None when self-hosting never wins:
        the API is cheaper per token than electricity (p <= e), or V* exceeds one
        device's capacity, which means even a fully busy device costs more per
        token than the API (and n devices cross at n*V*, beyond their capacity too).
        """
        margin = self._api_usd_per_token - self.setup.energy_usd_per_token
        if margin <= 0:
            return None
        volume = self.setup.fixed_usd_per_month / margin
        return volume if volume <= self.setup.capacity_tokens_per_month else None

    def _payback_months(self, tokens_per_month: float) -> float | None:
        """Upfront price over the monthly saving, whatever the horizon; None when nothing is saved."""
        setup = self.setup
        if setup.is_rented:
            return None
        saving = self.api_monthly_usd(tokens_per_month) - setup.energy_usd_per_token * tokens_per_month
        if saving <= 0:
            return None
        return setup.devices_needed(tokens_per_month) * setup.price_usd / saving

    def break_even_months(self, tokens_per_month: float) -> float | None:
        """Months until the purchase is paid back by what the API would have cost.

        Only for bought hardware: upfront = price x devices needed; each month
        saves the API bill minus electricity. None ("never") when nothing is
        saved, or when the payback takes longer than the amortisation period the
        hardware is costed over: it is written off before it pays for itself.
        """
        months = self._payback_months(tokens_per_month)
        return months if months is not None and months <= self.setup.amortisation_months else None

    def explain(self, tokens_per_month: float) -> list[str]:
        """Plain-language notes on the edge cases a reader could otherwise misread."""
        setup, notes = self.setup, []
        if tokens_per_month <= 0:
            notes.append(
                f"At zero volume the API costs nothing, while self-hosting still pays "
                f"${setup.fixed_usd_per_month:,.2f}/month for the {'rented' if setup.is_rented else 'amortised'} device."
            )
        if setup.fixed_usd_per_month == 0:
            notes.append("The hardware is free, so self-hosting costs only electricity: it wins from the first token "
                         "whenever the API charges more per token than the power does.")
        needed = setup.devices_needed(tokens_per_month)
        if needed > 1:
            notes.append(
                f"One device serves at most {setup.capacity_tokens_per_month:,.0f} tokens/month at "
                f"{setup.throughput_tok_s:,.1f} tokens/s; this volume needs {needed} devices."
            )
        payback = self._payback_months(tokens_per_month)
        if payback is not None and payback > setup.amortisation_months:
            notes.append(
                f"At this volume the {self.api_name} bill saved would pay the hardware back in {payback:,.0f} months, "
                f"beyond its {setup.amortisation_years:g}-year amortisation: break-even never."
            )
        if self.crossover_tokens_per_month is None:
            notes.append(
                f"Self-hosting never beats {self.api_name}: even fully busy, the device costs "
                f"${setup.floor_usd_per_m_tokens:,.2f} per million tokens against ${self.api_usd_per_m_tokens:,.2f}."
            )
        return notes
