"""The ledger's group commit: concurrent requests share transactions, each row is written exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy.exc import IntegrityError

from selfhost.gateway.ledger import Ledger, LedgerEntry, RequestIds
from selfhost.gateway.usage import PricedUsage
from selfhost.plan.pricing import Unpriced, UsageRecord


def entry(request_id: str) -> LedgerEntry:
    priced = PricedUsage(UsageRecord(input_tokens=3, output_tokens=2), Unpriced("m", "test"), estimated=False)
    return LedgerEntry(request_id=request_id, time=dt.datetime.now(dt.UTC), key_name=None, model="m",
                       deployment="m/0", upstream_model="m", endpoint="chat/completions", status="completed",
                       priced=priced)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    """Every ledger test runs on SQLite (the default) and on a real PostgreSQL server (tests/gateway/postgres.py)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def ledger(ledger_url):
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.close()


def test_concurrent_records_are_each_committed_once(ledger):
    ids = [f"req-{i}" for i in range(300)]

    async def traffic():
        await asyncio.gather(*(ledger.record(entry(i)) for i in ids))

    asyncio.run(traffic())
    assert sorted(r["request_id"] for r in ledger.rows()) == sorted(ids)


def test_a_row_that_cannot_be_written_fails_only_its_own_request(ledger):
    async def traffic():
        await ledger.record(entry("taken"))
        return await asyncio.gather(*(ledger.record(entry(i)) for i in ("a", "taken", "b", "c")),
                                    return_exceptions=True)

    outcomes = asyncio.run(traffic())
    assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
    assert isinstance(outcomes[1], IntegrityError)  # the request id is the key: never two rows for one request
    assert sorted(r["request_id"] for r in ledger.rows()) == ["a", "b", "c", "taken"]


def test_rows_of_many_loop_turns_each_wait_for_their_own_commit(ledger):
    """Rows are handed to the writer once per event-loop turn: a row recorded in a later turn is committed too,
    and no record() returns before its row is in the database."""
    async def one(i):
        await asyncio.sleep(0.001 * (i % 7))  # spread over many turns
        await ledger.record(entry(f"t-{i}"))
        assert any(r["request_id"] == f"t-{i}" for r in ledger.rows())

    async def traffic():
        await asyncio.gather(*(one(i) for i in range(60)))

    asyncio.run(traffic())
    assert len(ledger.rows()) == 60


def test_close_commits_rows_recorded_in_a_turn_that_has_not_ended(ledger_url):
    ledger = Ledger(ledger_url)

    async def record_then_close_at_once():
        pending = [asyncio.ensure_future(ledger.record(entry(f"n-{i}"))) for i in range(5)]
        await asyncio.sleep(0)  # each record() ran; the hand-over of their turn is still to come
        ledger.close()  # on the loop's thread, before that hand-over
        await asyncio.gather(*pending)

    asyncio.run(record_then_close_at_once())
    assert len(Ledger(ledger_url).rows()) == 5


def test_request_ids_are_32_hex_digits_and_unique():
    ids = [RequestIds().new() for _ in range(50)] + [RequestIds().new() for _ in range(50)]
    one = RequestIds()
    ids += [one.new() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_close_commits_what_was_queued(ledger_url):
    ledger = Ledger(ledger_url)

    async def queue_then_close():
        pending = [asyncio.ensure_future(ledger.record(entry(f"q-{i}"))) for i in range(50)]
        await asyncio.sleep(0)  # every record() has queued its row
        await asyncio.to_thread(ledger.close)
        await asyncio.gather(*pending)

    asyncio.run(queue_then_close())
    assert len(Ledger(ledger_url).rows()) == 50


def test_the_writers_batch_insert_stores_rows_as_sqlalchemy_does(ledger):
    """The batch path goes to the driver directly: its rows must read back exactly as SQLAlchemy's own insert's
    (a datetime, a boolean, an exact cost, None), or budgets and reports would read them differently."""
    from decimal import Decimal

    from selfhost.plan.pricing import Cost

    when = dt.datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=dt.UTC)
    cost = Cost(model_id="gpt-4o-mini", usd=Decimal("0.000123"), input_usd=Decimal("0.000003"),
                output_usd=Decimal("0.00012"), as_of=dt.date(2026, 12, 1), since=None, source="catalog")

    def priced_entry(request_id: str) -> LedgerEntry:
        usage = UsageRecord(input_tokens=12, cached_input_tokens=4, output_tokens=60, reasoning_tokens=4)
        return LedgerEntry(request_id=request_id, time=when, key_name="team-a", model="gpt", deployment="gpt/0",
                           upstream_model="gpt-4o-mini", endpoint="chat/completions", status="completed",
                           priced=PricedUsage(usage, cost, estimated=True))

    ledger.write(priced_entry("one-by-sqlalchemy"))
    ledger.write_batch([priced_entry("batch-1"), priced_entry("batch-2"), entry("batch-unpriced")])
    rows = {r.pop("request_id"): r for r in ledger.rows()}
    assert rows["batch-1"] == rows["batch-2"] == rows["one-by-sqlalchemy"]
    assert rows["batch-1"]["usage_estimated"] is True and rows["batch-1"]["cost_usd"] == "0.000123"
    assert rows["batch-unpriced"]["cost_usd"] is None and rows["batch-unpriced"]["key_name"] is None
