"""RelayResponse: a stream ends quietly when its client leaves, and any other cancellation goes on up."""

from __future__ import annotations

import asyncio

import pytest

from selfhost.gateway.relay_response import RelayResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


def test_a_finished_stream_is_sent_whole_and_leaves_no_watcher():
    sent = []

    async def chunks():
        yield b"a"
        yield b"b"

    async def receive():
        await asyncio.Event().wait()  # the client never leaves

    async def send(message):
        sent.append(message)

    async def run():
        await RelayResponse(chunks())(SCOPE, receive, send)
        await asyncio.sleep(0)  # a late cancel, if any, would land here
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    left = asyncio.run(run())
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b""]
    assert left == []


def test_the_client_leaving_ends_the_stream_quietly_and_closes_the_relay():
    closed = asyncio.Event()
    disconnect = asyncio.Event()

    async def chunks():
        try:
            yield b"a"
            disconnect.set()
            await asyncio.Event().wait()  # an upstream that stalls
        finally:
            closed.set()

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    async def run():
        await asyncio.wait_for(RelayResponse(chunks())(SCOPE, receive, send), 5)
        return closed.is_set()

    assert asyncio.run(run())


def test_a_cancellation_from_elsewhere_goes_on_up():
    async def chunks():
        yield b"a"
        await asyncio.Event().wait()

    async def receive():
        await asyncio.Event().wait()

    async def send(message):
        pass

    async def run():
        task = asyncio.create_task(RelayResponse(chunks())(SCOPE, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
