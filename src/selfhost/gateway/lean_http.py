"""A lean HTTP/1.1 client for the gateway's plain-`http` upstreams reached without a proxy.

aiohttp's request and response machinery cost the gateway ~0.12 ms of CPU per proxied
request on the 2-core VM (in one process: an aiohttp POST 120-155 us, this client's
35-48 us), a quarter of all it spends on one. Here a request is one write of its head
and body on a kept-alive connection, and the answer is parsed by httptools (uvicorn's
parser, already a gateway dependency), chunked bodies included. TLS upstreams and
those behind HTTP(S)_PROXY keep aiohttp (upstream_http.open_session), as do the
health probes.

Failures are aiohttp's exception types, so the proxy's retry rules and failure names
hold unchanged: a refused or unreachable upstream is a ConnectError, a slow connect a
ConnectTimeout, a wait for headers or the next chunk past `read_timeout_s` a
ReadTimeout, and a connection closed before its answer ended a ServerDisconnectedError
(a stream's relay sees it end without `[DONE]`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import httptools

READ_HIGH_WATER = 256 * 1024  # bytes of a streamed body held before the socket stops being read
# An idle connection older than this is closed, not reused: uvicorn-based servers (vLLM, selfhost) close theirs after
# 5 s idle, and a request written onto a connection as its server closes it fails (as with aiohttp, it is not
# retried on the same deployment: the upstream may have read it).
IDLE_REUSE_S = 4.0


class LeanConnectError(aiohttp.ClientConnectionError):
    """The upstream refused the connection or could not be reached."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; one request at a time."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0  # when it went back to the pool
        self._response: LeanResponse | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._response is None:  # bytes on an idle connection answer nothing we asked: do not reuse it
            self.closed = True
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(aiohttp.ServerDisconnectedError(f"malformed response: {err}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            if response.headers_done and response.until_close:  # a body that ends with its connection
                self.on_message_complete()
            else:
                self._fail(aiohttp.ServerDisconnectedError("the upstream closed the connection mid-answer"))

    # -- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        response.status = self.parser.get_status_code()
        names = {name.lower() for name, _ in response.raw_headers}
        response.until_close = b"content-length" not in names and b"transfer-encoding" not in names
        response.headers_done = True
        response.wake()

    def on_body(self, body: bytes) -> None:
        response = self._response
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered > READ_HIGH_WATER and not response.paused:
            response.paused = True
            self.transport.pause_reading()
        response.wake()

    def on_message_complete(self) -> None:
        response = self._response
        response.complete = True
        response.keep_alive = not self.closed and self.parser.should_keep_alive() and not response.until_close
        response.wake()

    # -- the request's side ------------------------------------------------------------

    def start(self, response: LeanResponse, request: bytes) -> None:
        self._response = response
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(request)

    def finished(self) -> None:
        self._response = None

    def _fail(self, err: BaseException) -> None:
        response = self._response
        if response is not None and response.error is None:
            response.error = err
            response.wake()


class LeanResponse:
    """What the proxy reads of an upstream answer: the status, the whole body, or its chunks as they come."""

    def __init__(self, pool: LeanPool, key: tuple[str, int], connection: _Connection, read_timeout_s: float):
        self._pool, self._key, self._connection, self._read_timeout_s = pool, key, connection, read_timeout_s
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.headers_done = self.complete = self.until_close = self.keep_alive = self.paused = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._released = False

    @property
    def content(self) -> LeanResponse:
        """aiohttp's spelling (`response.content.iter_any()`), so the proxy reads either client's answer alike."""
        return self

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the parser has more to say; ReadTimeout (asyncio.TimeoutError) past the read timeout."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # A bare timer, not asyncio.timeout(): its context manager (task lookups, cancel-and-convert) was ~5% of
        # the gateway's CPU, paid on every wait.
        timer = loop.call_later(self._read_timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    async def wait_for_headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    def _take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            if not self._connection.closed:
                self._connection.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        parts = []
        while not self.complete:
            if self.chunks:
                parts.append(self._take())
            await self._wait()
        parts.append(self._take())
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever has come in since the last step, in one piece."""
        while True:
            if self.chunks:
                yield self._take()
            elif self.complete:
                return
            else:
                await self._wait()

    def release(self) -> None:
        """Done with the answer: its connection is kept for the next request if the answer ended cleanly."""
        if self._released:
            return
        self._released = True
        self._connection.finished()
        if self.complete and self.keep_alive and self.error is None:
            self._pool.put_back(self._key, self._connection)
        else:
            self._connection.transport.close()

    def close(self) -> None:
        """Drop the connection (mid-answer it cannot be reused)."""
        self.complete = False
        self.release()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class LeanPool:
    """Kept-alive connections per (host, port), no cap on their number (a deployment's `max_concurrency` is
    the gateway's own limit, as with the aiohttp session)."""

    def __init__(self, read_timeout_s: float, connect_timeout_s: float):
        self.read_timeout_s, self.connect_timeout_s = read_timeout_s, connect_timeout_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._head_cache: dict[str, tuple[dict, tuple[tuple[str, int], bytes, bytes]]] = {}

    @staticmethod
    def serves(url: str, via_proxy: dict) -> bool:
        return url.startswith("http://") and not via_proxy

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> LeanResponse:
        """The answer once its status and headers are in (its body not read yet: read(), iter_any(), then
        release() or close())."""
        key, head_start, head_end = self._heads(url, headers)
        connection = await self._connection(key)
        response = LeanResponse(self, key, connection, self.read_timeout_s)
        connection.start(response, b"%s%d%s%s" % (head_start, len(body), head_end, body))
        try:
            await response.wait_for_headers()
        except BaseException:
            response.close()
            raise
        return response

    def _heads(self, url: str, headers: dict[str, str]) -> tuple[tuple[str, int], bytes, bytes]:
        """(host, port) and the request head around its Content-Length value: the same for every request to a
        deployment, so built once per (url, headers) (a deployment's headers are one dict for its life)."""
        cached = self._head_cache.get(url)
        if cached is not None and cached[0] is headers:
            return cached[1]
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head_start = f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: ".encode("latin-1")
        head_end = "".join(["\r\n", *(f"{name}: {value}\r\n" for name, value in headers.items()), "\r\n"])
        heads = ((parts.hostname, parts.port or 80), head_start, head_end.encode("latin-1"))
        self._head_cache[url] = (headers, heads)
        return heads

    def put_back(self, key: tuple[str, int], connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(connection)

    async def _connection(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle.get(key)
        if idle:
            fresh_after = time.monotonic() - IDLE_REUSE_S
            while idle:
                connection = idle.pop()  # the most recently used first
                if not connection.closed and connection.idle_since >= fresh_after:
                    return connection
                connection.transport.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(_Connection, key[0], key[1])
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as err:
            raise LeanConnectError(f"cannot connect to {key[0]}:{key[1]}: {err.strerror or err}") from None
        return connection

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.transport.close()
        self._idle.clear()
