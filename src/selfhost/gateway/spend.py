"""Spend from the ledger, grouped by key, model or day: what `selfhost spend` prints."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select

from selfhost.errors import InvalidParameterError
from selfhost.gateway.ledger import Ledger, requests_table

GROUPINGS = ("key", "model", "day")


@dataclass(frozen=True)
class SpendRow:
    group: str
    requests: int
    input_tokens: int
    output_tokens: int  # reasoning tokens included: both are billed as output
    cost_usd: Decimal  # priced requests only
    unpriced_requests: int  # counted, never treated as $0


def spend_by(ledger: Ledger, by: str = "model", since: dt.date | None = None) -> list[SpendRow]:
    if by not in GROUPINGS:
        raise InvalidParameterError(f"--by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    t = requests_table
    query = select(t.c.time, t.c.key_name, t.c.model, t.c.input_tokens, t.c.output_tokens, t.c.reasoning_tokens,
                   t.c.cost_usd)
    if since is not None:
        query = query.where(t.c.time >= dt.datetime.combine(since, dt.time(), dt.UTC))
    groups: dict[str, list] = {}
    with ledger.engine.connect() as conn:
        for row in conn.execute(query):
            label = {"key": row.key_name or "(no key)", "model": row.model, "day": utc_day(row.time)}[by]
            acc = groups.setdefault(label, [0, 0, 0, Decimal(0), 0])
            acc[0] += 1
            acc[1] += row.input_tokens
            acc[2] += row.output_tokens + row.reasoning_tokens
            if row.cost_usd is None:
                acc[4] += 1
            else:
                acc[3] += Decimal(row.cost_usd)
    return [SpendRow(label, *acc) for label, acc in sorted(groups.items())]


def utc_day(time: dt.datetime) -> str:
    """The UTC date of a ledger time: SQLite gives back the UTC time as written, without a zone; PostgreSQL an
    aware time in the session's zone, which may be another day."""
    return (time.astimezone(dt.UTC) if time.tzinfo is not None else time).date().isoformat()
