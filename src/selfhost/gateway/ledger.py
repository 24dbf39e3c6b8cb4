"""The spend ledger: one row per completed gateway request, in a real database.

SQLite in WAL mode by default; PostgreSQL (`postgresql://...`, through psycopg 3) or
any other SQLAlchemy URL otherwise. Each request is one
row keyed by a unique request id, committed before the client sees the end of its
response: a `kill -9` of the server loses no request whose response completed, and a
row can never be written twice (the key forbids it). With `synchronous=NORMAL`, WAL
commits survive a process crash; only a power loss may roll back the last few.
Upstream API keys are never columns here.

One writer thread commits for every request (group commit): the rows that arrived
while it wrote the last batch go in the next transaction together, and each request
awaits the commit that holds its row. Under load that is one commit, and one wake-up
of the event loop, for many requests, instead of a thread hop and a transaction each.
The rows recorded in one turn of the event loop reach the writer together too: one
hand-over (a futex wake, dear on a sandboxed kernel) per turn, not per request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import queue
import random
import threading
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

from selfhost.gateway.ledger_insert import BatchInsert
from selfhost.gateway.usage import PricedUsage, usd_text

log = logging.getLogger("selfhost.gateway")

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
            "cost_usd": usd_text(cost.usd) if cost.is_priced else None,
            "unpriced_reason": None if cost.is_priced else cost.reason,
            "price_model": cost.model_id,
            "price_source": cost.source if cost.is_priced else None,
            "price_as_of": cost.as_of.isoformat() if cost.is_priced and cost.as_of else None,
        }


class RequestIds:
    """Unique request ids (32 hex digits) without a system call each, as uuid4 makes (os.urandom).

    A generator seeded from the OS once per process: the ids of two runs differ as much as uuid4's.
    Not secrets: they name a ledger row and travel in `x-selfhost-request-id`."""

    def __init__(self):
        self._random = random.Random(os.urandom(32))

    def new(self) -> str:
        return f"{self._random.getrandbits(128):032x}"


new_request_id = RequestIds().new


def default_ledger_url() -> str:
    return f"sqlite:///{Path.home() / '.local' / 'share' / 'selfhost' / 'ledger.db'}"


def ledger_url(url: str | None) -> str:
    """`url` with a PostgreSQL URL's driver made psycopg 3 (`pip install 'selfhost[postgres]'`), which SQLAlchemy
    would otherwise take to be psycopg2; a missing driver is one clear error, before the server starts."""
    url = url or default_ledger_url()
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        from selfhost.gateway.config import GatewayConfigError

        raise GatewayConfigError("a PostgreSQL ledger needs the psycopg driver: pip install 'selfhost[postgres]'"
                                 ) from None
    return f"postgresql+psycopg{sep}{rest}"


class Ledger:
    """One writer thread (SQLite allows one writer) commits the queued rows in batches, off the event loop."""

    def __init__(self, url: str | None = None):
        url = ledger_url(url)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._batch_insert = BatchInsert(self.engine, requests_table)
        # Lists of (entry, its loop, the future its request awaits); None asks the writer to stop.
        self._queue: queue.SimpleQueue[list[tuple[LedgerEntry, asyncio.AbstractEventLoop, asyncio.Future]] | None] = (
            queue.SimpleQueue())
        self._writer: threading.Thread | None = None  # started by the first record(): the CLI never needs it
        self._turns: dict[asyncio.AbstractEventLoop, list] = {}  # rows recorded in a loop's turn, handed over at its end

    def write(self, entry: LedgerEntry) -> None:
        """One row in its own transaction, on the calling thread, through SQLAlchemy (its errors are
        SQLAlchemy's: an IntegrityError for a request id already recorded)."""
        with self.engine.begin() as conn:
            conn.execute(insert(requests_table), [entry.row()])

    def write_batch(self, entries: list[LedgerEntry]) -> None:
        """Every row in one transaction: all of them are committed, or none (the writer's fast path)."""
        self._batch_insert.insert([entry.row() for entry in entries])

    async def record(self, entry: LedgerEntry) -> None:
        """Return once `entry` is committed (raises what its write raised)."""
        loop = asyncio.get_running_loop()
        committed = loop.create_future()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_batches, name="selfhost-ledger", daemon=True)
            self._writer.start()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = []
            loop.call_soon(self._hand_over, loop)
        turn.append((entry, loop, committed))
        await committed

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        turn = self._turns.pop(loop, None)
        if turn is not None:  # None: close() took it over
            self._queue.put(turn)

    def rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(requests_table).order_by(requests_table.c.time))]

    def close(self) -> None:
        if self._writer is not None:
            for loop in list(self._turns):  # rows recorded in a turn that has not ended yet
                turn = self._turns.pop(loop, None)
                if turn is not None:
                    self._queue.put(turn)
            self._queue.put(None)  # the rows queued before it are committed first
            self._writer.join()
        self.engine.dispose()

    def _write_batches(self) -> None:
        stopping = False
        while not stopping:
            turns = [self._queue.get()]
            while True:  # everything that queued up meanwhile joins this commit
                try:
                    turns.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in turns
            batch = [item for turn in turns if turn is not None for item in turn]
            if batch:
                self._commit(batch)

    def _commit(self, batch: list) -> None:
        outcomes: list[BaseException | None]
        try:
            self.write_batch([entry for entry, _, _ in batch])
            outcomes = [None] * len(batch)
        except Exception:  # noqa: BLE001 - one bad row must not fail the others: write them one by one
            outcomes = []
            for entry, _, _ in batch:
                try:
                    self.write(entry)
                    outcomes.append(None)
                except Exception as err:  # noqa: BLE001 - handed to the request that awaits this row
                    log.error("ledger: request %s not recorded: %s", entry.request_id, type(err).__name__)
                    outcomes.append(err)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (_, loop, committed), outcome in zip(batch, outcomes):
            by_loop.setdefault(loop, []).append((committed, outcome))
        for loop, settled in by_loop.items():  # one wake-up per event loop per batch
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop has closed: nobody awaits these rows any more
                pass


def _settle(settled: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    for committed, outcome in settled:
        if committed.done():  # its request was cancelled; the row is in the ledger all the same
            continue
        if outcome is None:
            committed.set_result(None)
        else:
            committed.set_exception(outcome)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
