"""`selfhost spend --what-if`: the ledger's traffic priced as it was, all through an API, and all local.

Each recorded request keeps its tokens (prompt, cached, output, reasoning), so it can
be repriced exactly: through a catalog model at the price in force on its own day,
or on a local model at its configured rate (local_meter.LocalRate). The totals are
scaled to a 30-day month over the span of traffic recorded (at least one day): the
self-host-or-API question, answered from the operator's own requests.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select

from selfhost.gateway.config import ModelEntry
from selfhost.gateway.ledger import Ledger, requests_table
from selfhost.gateway.local_meter import LocalRate
from selfhost.plan.pricing import UsageRecord, price_usage

DAYS_PER_MONTH = Decimal(30)


@dataclass(frozen=True)
class Scenario:
    label: str
    usd: Decimal  # over the recorded span, priced requests only
    monthly_usd: Decimal
    unpriced_requests: int


def what_if(ledger: Ledger, api_model: str | None, local: ModelEntry | None,
            since: dt.date | None = None) -> tuple[list[Scenario], int, float]:
    """(scenarios, requests, days of traffic they span)."""
    t = requests_table
    query = select(t.c.time, t.c.input_tokens, t.c.cached_input_tokens, t.c.output_tokens, t.c.reasoning_tokens,
                   t.c.cost_usd)
    if since is not None:
        query = query.where(t.c.time >= dt.datetime.combine(since, dt.time(), dt.UTC))
    with ledger.engine.connect() as conn:
        rows = list(conn.execute(query))
    if not rows:
        return [], 0, 0.0
    span_days = max((max(r.time for r in rows) - min(r.time for r in rows)).total_seconds() / 86400, 1.0)
    scale = DAYS_PER_MONTH / Decimal(str(span_days))
    totals: dict[str, list] = {"as recorded": [Decimal(0), 0]}
    for row in rows:
        usage = UsageRecord(input_tokens=row.input_tokens, cached_input_tokens=row.cached_input_tokens,
                            output_tokens=row.output_tokens, reasoning_tokens=row.reasoning_tokens)
        _add(totals["as recorded"], None if row.cost_usd is None else Decimal(row.cost_usd))
        if api_model is not None:
            cost = price_usage(usage, api_model, row.time)
            _add(totals.setdefault(f"all through {api_model}", [Decimal(0), 0]), cost.usd if cost.is_priced else None)
        if local is not None:
            cost = LocalRate(local).price(usage, estimated=False).cost
            _add(totals.setdefault(f"all on local {local.name}", [Decimal(0), 0]),
                 cost.usd if cost.is_priced else None)
    scenarios = [Scenario(label, usd, (usd * scale).quantize(Decimal("0.01")), unpriced)
                 for label, (usd, unpriced) in totals.items()]
    return scenarios, len(rows), span_days


def _add(total: list, usd: Decimal | None) -> None:
    if usd is None:
        total[1] += 1
    else:
        total[0] += usd
