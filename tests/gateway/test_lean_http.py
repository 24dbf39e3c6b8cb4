"""The lean HTTP/1.1 client: kept-alive connections, bodies by length, chunks or close, and its failures
as the aiohttp errors the proxy's retry rules know."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from selfhost.gateway.lean_http import LeanConnectError, LeanPool
from selfhost.gateway.upstream_http import failure_name


async def serve(answers: list[bytes], close_after: set[int] = frozenset()):
    """A raw server that answers the n-th request it reads with answers[n] (closing after those in
    close_after); returns (server, its port, the number of connections it accepted)."""
    accepted = [0]
    served = [0]

    async def on_client(reader, writer):
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                n = served[0]
                served[0] += 1
                writer.write(answers[n])
                await writer.drain()
                if n in close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


JSON_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\ndata:\r\n3\r\n 1\n\r\n0\r\n\r\n")


def test_connections_are_kept_alive_and_bodies_read_by_length_and_by_chunks():
    async def run():
        server, port, accepted = await serve([JSON_ANSWER, CHUNKED, JSON_ANSWER])
        pool = LeanPool(read_timeout_s=5, connect_timeout_s=5)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        first = await pool.post(url, b"{}", {"Content-Type": "application/json"})
        assert (first.status, await first.read()) == (200, b'{"a":1}')
        first.release()
        second = await pool.post(url, b"{}", {})
        assert b"".join([chunk async for chunk in second.content.iter_any()]) == b"data: 1\n"
        second.release()
        third = await pool.post(url, b"{}", {})
        assert await third.read() == b'{"a":1}'
        third.release()
        pool.close()
        server.close()
        return accepted[0]

    assert asyncio.run(run()) == 1


def test_a_body_without_length_ends_with_its_connection_and_a_closed_idle_connection_is_not_reused():
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"

    async def run():
        server, port, accepted = await serve([JSON_ANSWER, until_close, JSON_ANSWER], close_after={0, 1})
        pool = LeanPool(read_timeout_s=5, connect_timeout_s=5)
        url = f"http://127.0.0.1:{port}/x"
        first = await pool.post(url, b"", {})
        await first.read()
        first.release()  # kept, but the server closes it
        await asyncio.sleep(0.1)
        second = await pool.post(url, b"", {})
        assert await second.read() == b"all of it"
        second.release()
        third = await pool.post(url, b"", {})
        assert await third.read() == b'{"a":1}'
        third.release()
        pool.close()
        server.close()
        return accepted[0]

    assert asyncio.run(run()) == 3


def test_failures_are_the_aiohttp_errors_the_proxy_retries_on():
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"

    async def run():
        server, port, _ = await serve([cut], close_after={0})
        pool = LeanPool(read_timeout_s=5, connect_timeout_s=5)
        response = await pool.post(f"http://127.0.0.1:{port}/x", b"", {})
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await response.read()
        response.close()
        server.close()
        await server.wait_closed()
        with pytest.raises(LeanConnectError) as refused:
            await pool.post(f"http://127.0.0.1:{port}/x", b"", {})
        assert failure_name(refused.value) == "ConnectError"

        async def silent(reader, writer):
            await asyncio.sleep(5)

        hanging = await asyncio.start_server(silent, "127.0.0.1", 0)
        slow_pool = LeanPool(read_timeout_s=0.2, connect_timeout_s=5)
        with pytest.raises(asyncio.TimeoutError) as timed_out:
            await slow_pool.post(f"http://127.0.0.1:{hanging.sockets[0].getsockname()[1]}/x", b"", {})
        assert failure_name(timed_out.value) == "ReadTimeout"
        hanging.close()

    asyncio.run(run())


def test_only_plain_http_without_a_proxy_takes_the_lean_client():
    assert LeanPool.serves("http://10.0.0.7:8000/v1", {})
    assert not LeanPool.serves("https://api.openai.com/v1", {})
    assert not LeanPool.serves("http://10.0.0.7:8000/v1", {"proxy": "http://proxy:3128", "proxy_auth": None})


def test_a_connection_idle_too_long_is_closed_not_reused(monkeypatch):
    import selfhost.gateway.lean_http as lean_http

    monkeypatch.setattr(lean_http, "IDLE_REUSE_S", 0.05)

    async def run():
        server, port, accepted = await serve([JSON_ANSWER, JSON_ANSWER, JSON_ANSWER])
        pool = LeanPool(read_timeout_s=5, connect_timeout_s=5)
        url = f"http://127.0.0.1:{port}/x"
        for pause in (0, 0, 0.2):  # the second request reuses the first's connection; the third, after a pause, not
            await asyncio.sleep(pause)
            response = await pool.post(url, b"", {})
            await response.read()
            response.release()
        pool.close()
        server.close()
        return accepted[0]

    assert asyncio.run(run()) == 2
