"""replica.batched: a stream's deltas in lists, the first and the last never held back (no Ray needed)."""

from __future__ import annotations

import asyncio

import pytest

from selfhost.cluster.replica import batched
from selfhost.outputs import StreamDelta

LONG_S = 60.0  # an interval no test waits out: a list that had to wait for it would time the test out


def delta(i: int, finished: bool = False) -> StreamDelta:
    return StreamDelta("r", f"t{i}", [i], None, "length" if finished else None, 3, i)


async def collect(source, interval_s: float) -> list[list[int]]:
    return [[d.token_ids[0] for d in batch] async for batch in batched(source, interval_s)]


def test_first_delta_alone_then_the_rest_together_and_the_last_at_once():
    async def main():
        release = asyncio.Event()

        async def source():
            yield delta(1)
            await release.wait()  # the rest come only after the first list was taken
            for i in (2, 3):
                yield delta(i)
                await asyncio.sleep(0)
            yield delta(4, finished=True)

        lists = []
        async for batch in batched(source(), LONG_S):
            lists.append([d.token_ids[0] for d in batch])
            release.set()
        return lists

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [[1], [2, 3, 4]]


def test_zero_interval_sends_every_delta_alone():
    async def source():
        for i in range(3):
            yield delta(i, finished=i == 2)

    assert asyncio.run(collect(source(), 0)) == [[0], [1], [2]]


def test_a_stream_that_ends_without_a_finished_delta_ends():
    async def source():
        yield delta(1)
        await asyncio.sleep(0.01)
        yield delta(2)

    assert asyncio.run(asyncio.wait_for(collect(source(), LONG_S), 10)) == [[1], [2]]


def test_source_error_is_raised_after_what_came_before():
    async def source():
        yield delta(1)
        await asyncio.sleep(0.01)
        raise ValueError("bad request")

    async def main():
        got = []
        with pytest.raises(ValueError, match="bad request"):
            async for batch in batched(source(), LONG_S):
                got.append(len(batch))
        return got

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [1]


def test_closing_the_batches_closes_the_source():
    """The replica's consumer going away must abort the engine request (AsyncEngine.generate's finally)."""
    closed = asyncio.Event()

    async def source():
        try:
            yield delta(1)
            await asyncio.Event().wait()  # an engine that never produces again
        finally:
            closed.set()

    async def main():
        stream = batched(source(), LONG_S)
        assert [d.token_ids[0] for d in await stream.__anext__()] == [1]
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        await asyncio.wait_for(closed.wait(), 5)
        return closed.is_set()

    assert asyncio.run(main())
