"""Outbox: many requests' deltas in one stream item, first deltas at once, idle drains end (no Ray needed)."""

from __future__ import annotations

import asyncio

from selfhost.cluster.outbox import Outbox
from selfhost.outputs import StreamDelta

LONG_S = 60.0  # an interval or idle time no test waits out


def delta(request_id: str, i: int, finished: bool = False) -> StreamDelta:
    return StreamDelta(request_id, f"t{i}", [i], None, "length" if finished else None, 3, i)


def tokens(item) -> dict[str, list[int]]:
    return {request_id: [d.token_ids[0] for d in deltas] for request_id, deltas in item}


async def next_item(drain, timeout_s: float = 10.0):
    return await asyncio.wait_for(drain.__anext__(), timeout_s)


def test_one_item_carries_every_request_and_only_first_deltas_skip_the_interval():
    async def main():
        box = Outbox()
        box.begin()
        box.begin()
        drain = box.drain(LONG_S)
        box.put("a", delta("a", 1), first=True)
        first = await next_item(drain)  # a first delta goes at once
        box.put("a", delta("a", 2))
        box.put("a", delta("a", 3))
        waiting = asyncio.ensure_future(next_item(drain, LONG_S))
        await asyncio.sleep(0.2)
        held = not waiting.done()  # later deltas wait out the interval...
        box.put("b", delta("b", 1), first=True)  # ...until another request's first delta comes
        second = await asyncio.wait_for(waiting, 10)
        await drain.aclose()
        return first, held, second

    first, held, second = asyncio.run(main())
    assert tokens(first) == {"a": [1]}
    assert held
    assert tokens(second) == {"a": [2, 3], "b": [1]}
    assert [request_id for request_id, _ in second] == ["a", "b"]


def test_zero_interval_sends_whatever_is_pending_at_once():
    async def main():
        box = Outbox()
        box.begin()
        drain = box.drain(0.0)
        box.put("a", delta("a", 1), first=True)
        box.put("a", delta("a", 2))
        got = [tokens(await next_item(drain))]
        box.put("a", delta("a", 3, finished=True))
        got.append(tokens(await next_item(drain)))
        await drain.aclose()
        return got

    assert asyncio.run(main()) == [{"a": [1, 2]}, {"a": [3]}]


def test_a_drain_ends_once_idle_and_not_while_a_request_is_under_way():
    async def main():
        box = Outbox()
        box.begin()
        drain = box.drain(0.0, idle_s=0.05)
        box.put("a", delta("a", 1, finished=True), first=True)
        assert tokens(await next_item(drain)) == {"a": [1]}
        pending = asyncio.ensure_future(next_item(drain))
        await asyncio.sleep(0.3)  # six idle periods: a request is still under way, so the drain stays
        still_open = not pending.done()
        box.end()
        try:
            await asyncio.wait_for(pending, 10)
        except StopAsyncIteration:
            return still_open, True, box.idle
        return still_open, False, box.idle

    still_open, ended, idle = asyncio.run(main())
    assert still_open and ended and idle


def test_deltas_put_before_any_drain_wait_for_it_in_order():
    async def main():
        box = Outbox()
        box.begin()
        for i in range(3):
            box.put("a", delta("a", i), first=i == 0)
        box.put("b", delta("b", 9), first=True)
        drain = box.drain(LONG_S)
        item = await next_item(drain)
        await drain.aclose()
        return item

    assert tokens(asyncio.run(main())) == {"a": [0, 1, 2], "b": [9]}


def test_a_newer_drain_takes_over_and_the_older_ends():
    async def main():
        box = Outbox()
        box.begin()
        old = box.drain(0.0)
        old_next = asyncio.ensure_future(next_item(old))
        await asyncio.sleep(0.05)  # the old drain waits for work
        new = box.drain(0.0)
        new_next = asyncio.ensure_future(next_item(new))
        await asyncio.sleep(0.05)
        box.put("a", delta("a", 1), first=True)
        got = tokens(await asyncio.wait_for(new_next, 10))
        try:
            await asyncio.wait_for(old_next, 10)
            old_ended = False
        except StopAsyncIteration:
            old_ended = True
        await new.aclose()
        return got, old_ended

    got, old_ended = asyncio.run(main())
    assert got == {"a": [1]}
    assert old_ended


def test_merged_deltas_say_what_the_separate_ones_said():
    """With merge_deltas a request's waiting deltas become one: text, ids and logprobs in order, the last's
    finish and counts, the first's prompt logprobs."""
    from selfhost.outputs import TokenLogprob

    def lp(i):
        return TokenLogprob(i, -float(i), {})

    parts = [StreamDelta("a", "He", [5], [lp(5)], None, 3, 1, prompt_logprobs=[None, lp(1)]),
             StreamDelta("a", "", [6], [lp(6)], None, 3, 2),
             StreamDelta("a", "llo", [7], [lp(7)], "stop", 3, 3)]

    async def main(merge: bool):
        box = Outbox(merge_deltas=merge)
        box.begin()
        for i, part in enumerate(parts):
            box.put("a", part, first=False)
        drain = box.drain(0.0)
        item = await next_item(drain)
        await drain.aclose()
        return item

    [(request_id, merged)] = asyncio.run(main(True))
    assert request_id == "a" and len(merged) == 1
    one = merged[0]
    assert (one.text, one.token_ids, one.finish_reason, one.num_prompt_tokens, one.num_output_tokens) == \
        ("Hello", [5, 6, 7], "stop", 3, 3)
    assert one.logprobs == [lp(5), lp(6), lp(7)] and one.prompt_logprobs == [None, lp(1)]
    [(_, separate)] = asyncio.run(main(False))
    assert separate == parts
