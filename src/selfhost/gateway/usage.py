"""A response's token usage as a UsageRecord, and its cost from the dated price catalog.

OpenAI's `usage` counts reasoning tokens inside `completion_tokens` and cached prompt
tokens inside `prompt_tokens`; UsageRecord wants the visible output and the hidden
reasoning apart (both billed as output) and the cached tokens as a part of the input.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from selfhost.errors import InvalidParameterError
from selfhost.gateway.rate_card import Pricer
from selfhost.plan.pricing import Cost, Unpriced, UsageRecord

UNPRICED = "unpriced"


@dataclass(frozen=True)
class PricedUsage:
    usage: UsageRecord
    cost: Cost | Unpriced
    estimated: bool  # counted by the gateway (an interrupted stream), not reported by the upstream

    @property
    def header(self) -> str:
        """The `x-selfhost-cost-usd` value: dollars, or "unpriced" (never a made-up $0)."""
        return usd_text(self.cost.usd) if self.cost.is_priced else UNPRICED


def usd_text(usd: Decimal) -> str:
    """Dollars as plain text, exact, without trailing zeros (however the sum was worked out)."""
    return format(usd.normalize(), "f")


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_record(usage: dict | None) -> UsageRecord | None:
    """The UsageRecord of an OpenAI `usage` object; None when there is none or it makes no sense."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    cached = _count((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    reasoning = _count((usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    try:
        return UsageRecord(input_tokens=prompt, cached_input_tokens=min(cached, prompt),
                           output_tokens=max(completion - reasoning, 0), reasoning_tokens=min(reasoning, completion))
    except InvalidParameterError:
        return None


def price(usage: UsageRecord, pricer: Pricer, when: dt.datetime, estimated: bool = False) -> PricedUsage:
    return PricedUsage(usage, pricer.price(usage, when), estimated)
