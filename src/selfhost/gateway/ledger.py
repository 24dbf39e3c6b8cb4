"""The spend ledger: one row per completed gateway request, in a real database.

SQLite in WAL mode by default (any SQLAlchemy URL otherwise). Each request is one
INSERT in its own transaction, keyed by a unique request id, committed before the
client sees the end of its response: a `kill -9` of the server loses no request whose
response completed, and a row can never be written twice (the key forbids it). With
`synchronous=NORMAL`, WAL commits survive a process crash; only a power loss may roll
back the last few. Upstream API keys are never columns here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
)

from selfhost.gateway.usage import PricedUsage

metadata = MetaData()

requests_table = Table(
    "gateway_requests", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("key_name", String(128), index=True),  # a virtual key's name; None without one
    Column("model", String(256), nullable=False, index=True),  # the public name the client asked for
    Column("deployment", String(256), nullable=False),
    Column("upstream_model", String(256), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("status", String(32), nullable=False),  # completed, interrupted
    Column("input_tokens", Integer, nullable=False),
    Column("cached_input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("usage_estimated", Boolean, nullable=False),
    Column("cost_usd", String(40)),  # a Decimal as text (exact); None when unpriced
    Column("unpriced_reason", String(256)),
    Column("price_model", String(256)),
    Column("price_source", String(512)),
    Column("price_as_of", String(10)),
)


@dataclass(frozen=True)
class LedgerEntry:
    request_id: str
    time: dt.datetime
    key_name: str | None
    model: str
    deployment: str
    upstream_model: str
    endpoint: str
    status: str
    priced: PricedUsage

    def row(self) -> dict:
        usage, cost = self.priced.usage, self.priced.cost
        return {
            "request_id": self.request_id, "time": self.time, "key_name": self.key_name, "model": self.model,
            "deployment": self.deployment, "upstream_model": self.upstream_model, "endpoint": self.endpoint,
            "status": self.status, "input_tokens": int(usage.input_tokens),
            "cached_input_tokens": int(usage.cached_input_tokens), "output_tokens": int(usage.output_tokens),
            "reasoning_tokens": int(usage.reasoning_tokens), "usage_estimated": self.priced.estimated,
            "cost_usd": format(cost.usd, "f") if cost.is_priced else None,
            "unpriced_reason": None if cost.is_priced else cost.reason,
            "price_model": cost.model_id,
            "price_source": cost.source if cost.is_priced else None,
            "price_as_of": cost.as_of.isoformat() if cost.is_priced and cost.as_of else None,
        }


def default_ledger_url() -> str:
    return f"sqlite:///{Path.home() / '.local' / 'share' / 'selfhost' / 'ledger.db'}"


class Ledger:
    """Writes go through one thread (SQLite allows one writer), off the event loop."""

    def __init__(self, url: str | None = None):
        url = url or default_ledger_url()
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfhost-ledger")

    def write(self, entry: LedgerEntry) -> None:
        with self.engine.begin() as conn:  # one transaction per request
            conn.execute(insert(requests_table).values(**entry.row()))

    async def record(self, entry: LedgerEntry) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self.write, entry)

    def rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(requests_table).order_by(requests_table.c.time))]

    def close(self) -> None:
        self._writer.shutdown(wait=True)  # pending writes finish first
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
