"""The lean entrance: a remote model's API request reaches the gateway without FastAPI's middleware stack.

A proxied request used to pass a dozen ASGI layers before the GatewayRouter (the size
limits, the JSON content-type rewrite, the admin gate, two key checks, each wrapping
`send` in turn): ~20% of the gateway's CPU under load, for answers that none of them
shape. Added outermost (`app.add_middleware(GatewayEntrance, gateway=gateway)`), this
takes a POST to the OpenAI or Ollama endpoints whose body names a remote model and
hands it straight to GatewayRouter.serve_named, the code the full stack runs too;
the access log and the last-resort catch keep their own classes around it.

Only the ordinary case takes the short path: headers within the limits, a JSON
Content-Type, a Content-Length within the body limit, the `--api-key` key (or a virtual key) present
and right, no CORS configured, a JSON body naming a remote model. Anything else
(an error to answer, a local model, a malformed body) is replayed, message for
message, into the full stack, which answers exactly as it does without this.
"""

from __future__ import annotations

import hashlib
import secrets

from selfhost.gateway.admission import carries_virtual_key, presented_key
from selfhost.gateway.ollama_bridge import OLLAMA_PATHS
from selfhost.gateway.router import ENDPOINTS, GatewayRouter
from selfhost.gateway.wire_json import json_object
from selfhost.server.app import AccessLog
from selfhost.server.guards import API_KEY_DIGEST, CatchAll
from selfhost.server.models import canonical

LEAN_PATHS = frozenset(ENDPOINTS) | frozenset(OLLAMA_PATHS)


class GatewayEntrance:
    def __init__(self, app, gateway):
        self.app, self.gateway = app, gateway
        self.router = _inner(app, GatewayRouter)
        self._body_limit: tuple[object, int] = (None, 0)  # (settings, its max_body_bytes_value), parsed once

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in LEAN_PATHS):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        settings = state.settings
        if self._body_limit[0] is not settings:  # a property that parses its text on every read
            self._body_limit = (settings, settings.max_body_bytes_value)
        max_body_bytes = self._body_limit[1]
        if settings.cors or not _within_limits(scope["headers"], settings, max_body_bytes):
            return await self.app(scope, receive, send)
        messages, body = await _read(receive, max_body_bytes)
        raw = json_object(body) if body is not None else None
        name = raw.get("model") if raw is not None else None
        digest = _key_digest(scope, settings.api_key) if isinstance(name, str) else None
        if digest is None or not self.gateway.table.is_remote(name := canonical(name)):
            return await self.app(scope, _replay(messages, receive), send)

        async def proxied(scope, receive, send):
            await self.router.serve_named(scope, receive, send, body, raw, name)

        token = API_KEY_DIGEST.set(digest or None)  # as guards.ApiKeyAuth / router.VirtualKeyEntrance set it
        try:
            await AccessLog(CatchAll(proxied), state.metrics)(scope, receive, send)
        finally:
            API_KEY_DIGEST.reset(token)


def _inner(app, kind):
    """The layer of type `kind` inside `app`'s middleware chain (each layer keeps the next in `.app`)."""
    layer = app
    while not isinstance(layer, kind):
        layer = getattr(layer, "app", None)
        assert layer is not None, f"GatewayEntrance must wrap a stack holding a {kind.__name__}"
    return layer


def _within_limits(headers, settings, max_body_bytes: int) -> bool:
    """What guards.RequestLimits would let through without a word (else it answers, 431 or 413), with a JSON
    Content-Type (else app.AssumeJSON rewrites it, which a local fallback's route needs)."""
    if len(headers) > settings.max_headers or sum(len(k) + len(v) for k, v in headers) > settings.max_header_bytes:
        return False
    length = content_type = None
    for key, value in headers:
        if key == b"content-length":
            length = value
        elif key == b"content-type":
            if content_type is not None:
                return False
            content_type = value
    # No Content-Length: a chunked body, which the full stack reads and bounds.
    return (content_type == b"application/json" and length is not None and length.isdigit()
            and int(length) <= max_body_bytes)


def _key_digest(scope, api_keys: list[str]) -> bytes | None:
    """b"" where no key is needed here; the digest of the key that lets the request in; None where the full
    stack must answer (a missing or wrong `--api-key` key: its 401)."""
    if carries_virtual_key(scope):  # checked by the gateway's admission, after this
        return hashlib.sha256(presented_key(scope).encode("latin-1")).digest()
    if not api_keys:
        return b""
    # guards.ApiKeyAuth's reading of the headers, so exactly the requests it admits come through.
    headers = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else headers.get(b"x-api-key", b"").decode("latin-1")
    for key in api_keys:
        if secrets.compare_digest(given.encode("latin-1"), key.encode()):
            return hashlib.sha256(key.encode()).digest()
    return None


async def _read(receive, max_body_bytes: int) -> tuple[list[dict], bytes | None]:
    """(the messages received, the body; None when it did not arrive whole within the limit)."""
    messages, total = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client left while sending
            return messages, None
        total += len(message.get("body", b""))
        if total > max_body_bytes:
            return messages, None
        if not message.get("more_body", False):
            break
    if len(messages) == 1:
        return messages, messages[0].get("body", b"")
    return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[dict], receive):
    """A receive that gives back the messages already read, in order, then reads on."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
