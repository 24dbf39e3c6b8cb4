"""The gateway's HTTP client to its upstreams: one pooled aiohttp session, its failures, SSE lines.

aiohttp rather than httpx on this path: measured against a fast upstream on the
2-core machine, an httpx.AsyncClient spent ~1 ms of CPU per request at concurrency 1
and ~4 ms at 32 (its pool scans every connection, through anyio, per request), aiohttp
~0.2-0.4 ms. Connections are kept alive per upstream (HTTP/1.1) with no cap on their
number: a deployment's `max_concurrency` is the gateway's own limit. Plain-`http`
upstreams reached without a proxy go through the leaner client in lean_http instead;
this session serves TLS upstreams, proxied ones and the health probes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from selfhost.gateway.lean_http import LeanConnectError


class StreamCutShort(aiohttp.ClientError):
    """The upstream closed a stream before its `data: [DONE]`."""


# What a dead, refusing, slow or misbehaving upstream raises: all of it is "the upstream failed".
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

# Stable names for the failures that messages and logs carry, most specific first.
_FAILURE_NAMES = (
    (StreamCutShort, "RemoteProtocolError"),
    (aiohttp.ConnectionTimeoutError, "ConnectTimeout"),
    (LeanConnectError, "ConnectError"),
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerTimeoutError, "ReadTimeout"),
    (asyncio.TimeoutError, "ReadTimeout"),
    (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
    (aiohttp.ClientPayloadError, "ReadError"),
)


def open_session(timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientSession:
    """The pooled session (call on the running event loop). `timeout_s` bounds each wait for headers or data."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
    # No trust_env: it looks up ~/.netrc and the proxy variables in a thread on every request. The proxy is
    # looked up once per deployment instead (proxy_for).
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True,
                                 skip_auto_headers=("User-Agent",))


def proxy_for(url: str) -> dict:
    """The request options that send `url` through HTTP(S)_PROXY (NO_PROXY respected), as httpx did; {} for none."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return {}
    return {"proxy": proxy, "proxy_auth": auth}


def failure_name(err: BaseException) -> str:
    for kind, name in _FAILURE_NAMES:
        if isinstance(err, kind):
            return name
    return type(err).__name__


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The `data:` payloads of an SSE byte stream (comments, blank lines and other fields dropped), a list for
    each network read that completed at least one: what arrived together can be relayed in one write.

    Lines end at CR, LF or CRLF only (bytes.splitlines), never inside a payload's text:
    JSON may carry U+2028 or NEL raw, and a str.splitlines would cut the event there.
    """
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        batch = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if batch:
            yield batch
    if pending.startswith(b"data:"):
        yield [pending[5:].strip()]
