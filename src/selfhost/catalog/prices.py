"""Per-token API prices (data/api_prices.toml) that self-hosting is compared against."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache

from selfhost.catalog._data import read_data
from selfhost.catalog.names import unknown_name_error


@dataclass(frozen=True)
class ApiPrice:
    id: str
    provider: str
    model: str
    input_usd_per_m: float
    output_usd_per_m: float
    as_of: dt.date
    source: str
    retrieved: dt.date

    def __post_init__(self) -> None:
        for name in ("input_usd_per_m", "output_usd_per_m"):
            if getattr(self, name) < 0:
                raise ValueError(f"api price {self.id}: {name} must be >= 0, got {getattr(self, name)}")

    def blended_usd_per_m(self, output_share: float) -> float:
        """Price of a million tokens of which `output_share` are generated, the rest prompt."""
        return output_share * self.output_usd_per_m + (1 - output_share) * self.input_usd_per_m


@cache
def load_api_prices() -> dict[str, ApiPrice]:
    return {row["id"]: ApiPrice(**row) for row in read_data("api_prices.toml")["api"]}


def get_api_price(price_id: str) -> ApiPrice:
    prices = load_api_prices()
    if price_id not in prices:
        raise unknown_name_error("API price", price_id, prices)
    return prices[price_id]
