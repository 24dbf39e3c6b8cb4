"""What every HTTP request passes before a route sees it: size limits, the API key, and a last catch.

Pure ASGI middleware (streamed responses pass through untouched). Order, outermost first:
CatchAll -> RequestLimits -> ... -> ApiKeyAuth -> routes. So the key is checked before the
body is parsed (an unauthenticated client learns nothing from a 400), a body over the limit
is refused before it is buffered whole, and no exception, whatever its cause, reaches uvicorn:
uvicorn answers one with a bare 500 and closes the keep-alive connection, so the client's next,
valid request on it would fail.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from contextvars import ContextVar

from fastapi import Request

from selfhost.server.errors import APIError, error_response

log = logging.getLogger("selfhost.server")

# Reachable without a key even when the server has keys: liveness, and the chat page's own
# files (the page sends the key the user types with each API call).
PUBLIC_PATHS = ("/health", "/static/")
PUBLIC_EXACT = ("/",)
# Bytes past the body limit still read (and dropped) so the client can read its 413.
DRAIN_BYTES = 1 << 20

# Digest of the key the current request authenticated with (None without keys): the tenant that
# `--prefix-cache-scope key` keeps prefix-cache entries within. Per request (a context variable
# lives in the request's task), never the key itself.
API_KEY_DIGEST: ContextVar[bytes | None] = ContextVar("api_key_digest", default=None)


async def _send_error(scope, receive, send, err: APIError, headers: dict | None = None) -> None:
    response = error_response(Request(scope), err)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    await response(scope, receive, send)


class CatchAll:
    """An unexpected exception becomes the API's 500 error object, logged once, connection kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = [False]

        async def send_tracking(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as err:  # noqa: BLE001 - the point of this middleware
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started[0]:
                await _send_error(scope, receive, send,
                                  APIError(f"internal error: {type(err).__name__}", 500, code="internal_error"))


class RequestLimits:
    """Header count and size (431) and body size (413), checked before any route work.

    The body is read here, up to the limit, and replayed to the app: a request may not make
    the server buffer or parse more than `max_body_bytes`, whatever its Content-Length says.
    """

    def __init__(self, app, max_body_bytes: int, max_headers: int, max_header_bytes: int):
        self.app = app
        self.max_body_bytes, self.max_headers, self.max_header_bytes = max_body_bytes, max_headers, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        size = sum(len(k) + len(v) for k, v in headers)
        if len(headers) > self.max_headers or size > self.max_header_bytes:
            return await _send_error(scope, receive, send, APIError(
                f"request headers too large: {len(headers)} headers, {size} bytes (at most {self.max_headers} and "
                f"{self.max_header_bytes} bytes)", 431, code="headers_too_large"), {"Connection": "close"})
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body_bytes:
                # Read (and drop) a modest overflow before answering: closing on a client that is still
                # sending resets the connection, and it would never read the 413. A huge body is cut.
                while message.get("more_body", False) and total <= self.max_body_bytes + DRAIN_BYTES:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    total += len(message.get("body", b""))
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        # The rest of the body is not read: the connection cannot be reused, so say so.
        await _send_error(scope, receive, send, APIError(
            f"request body too large: at most {self.max_body_bytes} bytes (--max-body-bytes)", 413,
            code="request_too_large"), {"Connection": "close"})


class ApiKeyAuth:
    """With keys configured, every route but the public ones needs one: `Authorization: Bearer <key>`
    or `x-api-key: <key>` (Anthropic's header). That includes /metrics, /stats and the API docs, whose
    figures (a prefix-cache hit rate) would otherwise tell one client about another's prompts."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        # Read per request from the app's settings, so keys can change while the server runs.
        keys = [k.encode() for k in scope["app"].state.settings.api_key] if scope["type"] == "http" else []
        if not keys or self._public(scope["path"]) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else headers.get(b"x-api-key", b"").decode("latin-1")
        matched = [key for key in keys if secrets.compare_digest(given.encode("latin-1"), key)]
        if not matched:
            return await _send_error(scope, receive, send, APIError(
                "missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'", 401,
                code="invalid_api_key"))
        token = API_KEY_DIGEST.set(hashlib.sha256(matched[0]).digest())
        try:
            await self.app(scope, receive, send)
        finally:
            API_KEY_DIGEST.reset(token)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_EXACT or path.startswith(PUBLIC_PATHS)
