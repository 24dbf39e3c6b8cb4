"""The seam between the gateway and selfhost's own routes: an ASGI middleware.

For POST /v1/chat/completions, /v1/completions, /v1/embeddings, /api/chat and
/api/generate it reads the body once and looks at `model`: a remote name goes to the
Proxy (Ollama requests through ollama_bridge); anything else (a local model, a
malformed body) is replayed untouched to the routes behind, which answer exactly as
they do without a gateway. Every answer names who served it in
`x-selfhost-backend` (`local/<name>` for local models).
"""

from __future__ import annotations

import hashlib
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from selfhost.gateway.wire_json import json_object
from selfhost.gateway.admission import carries_virtual_key, presented_key
from selfhost.gateway.ollama_bridge import OLLAMA_PATHS, ollama_response, openai_payload
from selfhost.gateway.proxy import BACKEND_HEADER, LocalFallback, ProxyRequest
from selfhost.server.errors import APIError, error_response
from selfhost.server.guards import API_KEY_DIGEST
from selfhost.server.models import canonical

ENDPOINTS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
             "/v1/embeddings": "embeddings"}


class GatewayRouter:
    def __init__(self, app, gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith("/v1/models"):
            return await self._models(scope, receive, send)
        is_post = scope["type"] == "http" and scope["method"] == "POST"
        if not is_post or (scope["path"] not in ENDPOINTS and scope["path"] not in OLLAMA_PATHS):
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        raw = json_object(body)
        name = raw.get("model") if raw is not None else None
        if not isinstance(name, str):  # selfhost's routes say what is wrong with the body (after the key)
            try:
                self.gateway.admission.authenticate(scope)
            except APIError as err:
                return await error_response(Request(scope), err)(scope, receive, send)
            return await self._local(scope, body, receive, send, name)
        await self.serve_named(scope, receive, send, body, raw, canonical(name))

    async def serve_named(self, scope, receive, send, body: bytes, raw: dict, name: str) -> None:
        """A request whose body names `name` (canonical): admitted, then proxied or served locally.

        Also the lean entrance's way in (entrance.GatewayEntrance), so both paths run this same code."""
        try:
            key_name, reservation = self.gateway.admission.admit(scope, name, raw)
        except APIError as err:
            return await error_response(Request(scope), err)(scope, receive, send)
        streaming = False  # a relayed stream settles its own reservation when it ends
        try:
            if not self.gateway.table.is_remote(name):
                metered = self._metered(scope, send, name, raw, key_name, reservation)
                if metered is not None:
                    body = json.dumps(self.gateway.local_meter.request_body(raw, _endpoint(scope["path"]))).encode()
                return await self._local(scope, body, receive, metered or send, name)
            try:
                if scope["path"] in OLLAMA_PATHS:
                    request = ProxyRequest("chat/completions", openai_payload(scope["path"], {**raw, "model": name}),
                                           key_name, reservation)
                else:
                    request = ProxyRequest(ENDPOINTS[scope["path"]], {**raw, "model": name}, key_name, reservation)
                result = await self.gateway.proxy.handle(request)
            except APIError as err:
                return await error_response(Request(scope), err)(scope, receive, send)
            if isinstance(result, LocalFallback):
                raw = {**raw, "model": result.name}
                metered = self._metered(scope, send, result.name, raw, key_name, reservation)
                if metered is not None:
                    raw = self.gateway.local_meter.request_body(raw, _endpoint(scope["path"]))
                return await self._local(scope, json.dumps(raw).encode(), receive, metered or send, result.name)
            streaming = isinstance(result, StreamingResponse)
            if scope["path"] in OLLAMA_PATHS:
                result = ollama_response(scope["path"], name, result)
            await result(scope, receive, send)
        finally:
            if not streaming:
                reservation.release()  # a no-op once the ledger settled it

    def _metered(self, scope, send, name: str, raw: dict, key_name, reservation):
        """A `send` that prices and records a local model's answer (OpenAI or Ollama; a model without
        `[models.cost]` is recorded as unpriced); None for a model the config does not list."""
        meter = self.gateway.local_meter
        if not meter.is_metered(name):
            return None
        return meter.wrap_send(send, name, _endpoint(scope["path"]), raw, key_name, reservation)

    async def _models(self, scope, receive, send) -> None:
        """/v1/models lists remote names after the local models; /v1/models/<remote name> is its card."""
        table = self.gateway.table
        remote_cards = [{"id": name, "object": "model", "created": self.gateway.started_at, "owned_by": "gateway"}
                        for name in table.deployments]
        asked = scope["path"].removeprefix("/v1/models").removeprefix("/")
        if asked in table.deployments:
            card = next(c for c in remote_cards if c["id"] == asked)
            return await JSONResponse(card)(scope, receive, send)
        if asked:
            return await self.app(scope, receive, send)
        status, headers, body = await _captured(self.app, scope, receive)
        if status != 200:
            return await Response(body, status, headers=dict(headers))(scope, receive, send)
        listing = json.loads(body)
        listing["data"] = [*listing.get("data", []), *remote_cards]
        await JSONResponse(listing)(scope, receive, send)

    async def _local(self, scope, body: bytes, receive, send, name) -> None:
        backend = f"local/{name}".encode() if isinstance(name, str) else b"local"
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}

        async def send_with_backend(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (BACKEND_HEADER.encode(), backend)]}
            await send(message)

        await self.app(scope, _replay(body, receive), send_with_backend)


def _endpoint(path: str) -> str:
    """The ledger's name for an API path: "chat/completions", ..., or Ollama's "api/chat" / "api/generate"."""
    return ENDPOINTS.get(path) or path.removeprefix("/")


class VirtualKeyEntrance:
    """Outside the `--api-key` check: an API request carrying a virtual key (sk-selfhost-...) goes straight
    to the GatewayRouter, whose admission checks that key (401 when unknown or revoked); everything else
    meets the `--api-key` check as before. So virtual keys and `--api-key` keys work side by side.
    """

    def __init__(self, app):
        # The stack is built innermost first: app is ApiKeyAuth, and the layer inside it the GatewayRouter.
        inner = getattr(app, "app", None)
        assert isinstance(inner, GatewayRouter), "VirtualKeyEntrance must wrap ApiKeyAuth(GatewayRouter(...))"
        self.app, self.gateway_router = app, inner

    async def __call__(self, scope, receive, send):
        is_api_post = scope["type"] == "http" and scope["method"] == "POST" and (
            scope["path"] in ENDPOINTS or scope["path"] in OLLAMA_PATHS)
        if not is_api_post or not carries_virtual_key(scope):
            return await self.app(scope, receive, send)
        # What ApiKeyAuth would set: the key's digest scopes the prefix cache under --prefix-cache-scope key.
        token = API_KEY_DIGEST.set(hashlib.sha256(presented_key(scope).encode("latin-1")).digest())
        try:
            await self.gateway_router(scope, receive, send)
        finally:
            API_KEY_DIGEST.reset(token)


async def _captured(app, scope, receive) -> tuple[int, list, bytes]:
    """Run `app` and keep its whole response: (status, headers, body)."""
    start, chunks = {}, []

    async def keep(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])
               if k.lower() not in (b"content-length", b"content-type")]
    return start.get("status", 500), headers, b"".join(chunks)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left before sending it all
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that yields the already-read body once, then waits on the real one (for disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
