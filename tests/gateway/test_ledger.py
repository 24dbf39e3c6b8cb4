"""The ledger's group commit: concurrent requests share transactions, each row is written exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy.exc import IntegrityError

from selfhost.gateway.ledger import Ledger, LedgerEntry
from selfhost.gateway.usage import PricedUsage
from selfhost.plan.pricing import Unpriced, UsageRecord


def entry(request_id: str) -> LedgerEntry:
    priced = PricedUsage(UsageRecord(input_tokens=3, output_tokens=2), Unpriced("m", "test"), estimated=False)
    return LedgerEntry(request_id=request_id, time=dt.datetime.now(dt.UTC), key_name=None, model="m",
                       deployment="m/0", upstream_model="m", endpoint="chat/completions", status="completed",
                       priced=priced)


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
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


def test_close_commits_what_was_queued(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")

    async def queue_then_close():
        pending = [asyncio.ensure_future(ledger.record(entry(f"q-{i}"))) for i in range(50)]
        await asyncio.sleep(0)  # every record() has queued its row
        await asyncio.to_thread(ledger.close)
        await asyncio.gather(*pending)

    asyncio.run(queue_then_close())
    assert len(Ledger(f"sqlite:///{tmp_path / 'ledger.db'}").rows()) == 50
