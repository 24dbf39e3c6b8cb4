"""Budgets per virtual key: reserve an estimate at admission, settle the exact cost on completion.

A request is admitted while `spent + reserved + its estimate <= budget`; its estimate
stays reserved until the ledger has its real cost, then is swapped for it. So under
concurrency the spend can pass the budget only by what the requests already admitted
cost beyond their estimates. `spent` starts from the ledger's rows for the key in the
current period, read once per period, so a restart forgets nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import select

from selfhost.gateway.keys import VirtualKey
from selfhost.gateway.ledger import Ledger, requests_table
from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.rate_limits import RateEntry
from selfhost.plan.pricing import UsageRecord

DEFAULT_OUTPUT_ESTIMATE = 256  # output tokens assumed when a request sets no max_tokens
CHARS_PER_TOKEN = 4


@dataclass
class _KeySpend:
    period_start: dt.datetime | None
    spent: Decimal
    reserved: Decimal = Decimal(0)


@dataclass
class Reservation:
    """An admitted request's hold on its key's budget; settle or release it exactly once."""

    budgets: KeyBudgets | None
    key_name: str | None
    estimate: Decimal
    is_open: bool = field(default=True)
    rate_entry: RateEntry | None = None  # its place in the key's per-minute window

    def settle(self, cost_usd: Decimal | None, tokens: int | None = None) -> None:
        """Swap the estimate for the real cost (and tokens, when known); a no-op after the first call."""
        if self.is_open and self.budgets is not None:
            self.budgets._close(self, cost_usd or Decimal(0))
        if self.is_open and self.rate_entry is not None and tokens is not None:
            self.rate_entry.tokens = tokens
        self.is_open = False

    def release(self) -> None:
        self.settle(None)


UNMETERED = Reservation(None, None, Decimal(0), is_open=False)


class KeyBudgets:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._spend: dict[str, _KeySpend] = {}

    def admit(self, key: VirtualKey, estimate: Decimal, now: dt.datetime) -> Reservation | None:
        """A reservation, or None when the estimate does not fit what is left of the budget."""
        spend = self._current(key, now)
        if key.budget_usd is not None and spend.spent + spend.reserved + estimate > key.budget_usd:
            return None
        spend.reserved += estimate
        return Reservation(self, key.name, estimate)

    def spent(self, key: VirtualKey, now: dt.datetime) -> Decimal:
        return self._current(key, now).spent

    def _close(self, reservation: Reservation, cost_usd: Decimal) -> None:
        spend = self._spend.get(reservation.key_name)
        if spend is not None:
            spend.reserved -= reservation.estimate
            spend.spent += cost_usd

    def _current(self, key: VirtualKey, now: dt.datetime) -> _KeySpend:
        start = key.period_start(now)
        spend = self._spend.get(key.name)
        if spend is None or spend.period_start != start:
            reserved = spend.reserved if spend is not None else Decimal(0)
            spend = self._spend[key.name] = _KeySpend(start, self._ledger_spend(key.name, start), reserved)
        return spend

    def _ledger_spend(self, key_name: str, since: dt.datetime | None) -> Decimal:
        query = select(requests_table.c.cost_usd).where(requests_table.c.key_name == key_name)
        if since is not None:
            query = query.where(requests_table.c.time >= since)
        with self.ledger.engine.connect() as conn:
            return sum((Decimal(c) for (c,) in conn.execute(query) if c is not None), Decimal(0))


def estimate_cost(payload: dict, pricer: Pricer | None, now: dt.datetime) -> Decimal:
    """What a request may cost before it runs: its prompt (four characters a token) and its output cap."""
    if pricer is None:
        return Decimal(0)
    input_tokens, output_tokens = estimate_tokens(payload)
    cost = pricer.price(UsageRecord(input_tokens=input_tokens, output_tokens=output_tokens), now)
    return cost.usd if cost.is_priced else Decimal(0)


def estimate_tokens(payload: dict) -> tuple[int, int]:
    """(prompt tokens at four characters each, the output cap or DEFAULT_OUTPUT_ESTIMATE; 0 for embeddings)."""
    prompt = payload.get("messages", payload.get("prompt", payload.get("input", "")))
    input_tokens = math.ceil(len(json.dumps(prompt)) / CHARS_PER_TOKEN)
    cap = payload.get("max_completion_tokens") or payload.get("max_tokens")
    options = payload.get("options")  # Ollama's
    if cap is None and isinstance(options, dict):
        cap = options.get("num_predict")
    output_tokens = cap if isinstance(cap, int) and cap > 0 else DEFAULT_OUTPUT_ESTIMATE
    if "input" in payload and "messages" not in payload and "prompt" not in payload:
        output_tokens = 0  # embeddings
    return input_tokens, output_tokens
