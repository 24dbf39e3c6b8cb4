"""The admin API: virtual keys and spend over HTTP, behind the master key (`SELFHOST_MASTER_KEY`).

    POST   /admin/keys          {"name", "budget_usd"?, "period"?, "models"?, "rpm"?, "tpm"?} -> the key, once
    GET    /admin/keys          every key (never their text)
    GET    /admin/keys/{name}   one key and what it spent this period
    DELETE /admin/keys/{name}   revoke it
    GET    /admin/spend?by=model&since=YYYY-MM-DD

It sits outside the `--api-key` check (the master key is its own credential) and is
absent (404) unless SELFHOST_MASTER_KEY is set when the server starts.
"""

from __future__ import annotations

import datetime as dt
import hmac
import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from selfhost.errors import SelfhostError
from selfhost.gateway.admission import presented_key
from selfhost.gateway.keys import (
    DuplicateKeyError,
    UnknownKeyError,
    VirtualKey,
    parse_budget,
)
from selfhost.gateway.spend import spend_by
from selfhost.server.errors import APIError

MASTER_KEY_ENV = "SELFHOST_MASTER_KEY"


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    budget_usd: float | str | None = None
    period: str = "month"
    models: list[str] | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


def _card(key: VirtualKey) -> dict:
    return {"name": key.name, "key_prefix": key.shown_prefix, "period": key.period, "models": key.models,
            "budget_usd": None if key.budget_usd is None else str(key.budget_usd), "rpm": key.rpm, "tpm": key.tpm,
            "created_at": key.created_at.isoformat(), "revoked": not key.is_active}


def admin_app(gateway) -> Starlette:
    async def create(request: Request):
        try:
            new = NewKey.model_validate(await request.json())
        except (ValidationError, ValueError) as err:
            first = err.errors()[0] if isinstance(err, ValidationError) else {"msg": "body is not valid JSON"}
            field = ".".join(str(p) for p in first.get("loc", ()))
            raise APIError(f"{field}: {first['msg']}" if field else first["msg"], param=field or None,
                           code="invalid_value") from None
        key = gateway.keys.create(new.name, parse_budget(new.budget_usd), new.period,
                                  tuple(new.models) if new.models else None, new.rpm, new.tpm)
        return JSONResponse({**_card(gateway.keys.get(new.name)), "key": key}, 201)

    async def list_keys(request: Request):
        return JSONResponse({"data": [_card(k) for k in gateway.keys.all()]})

    async def show(request: Request):
        key = gateway.keys.get(request.path_params["name"])
        spent = gateway.budgets.spent(key, dt.datetime.now(dt.UTC))
        return JSONResponse({**_card(key), "spent_usd": str(spent)})

    async def revoke(request: Request):
        gateway.keys.revoke(request.path_params["name"])
        return JSONResponse(_card(gateway.keys.get(request.path_params["name"])))

    async def spend(request: Request):
        since = request.query_params.get("since")
        try:
            since_day = dt.date.fromisoformat(since) if since else None
        except ValueError:
            raise APIError(f"since must be YYYY-MM-DD, got {since!r}", param="since", code="invalid_value") from None
        rows = spend_by(gateway.ledger, request.query_params.get("by", "model"), since_day)
        return JSONResponse({"data": [{"group": r.group, "requests": r.requests, "input_tokens": r.input_tokens,
                                       "output_tokens": r.output_tokens, "cost_usd": str(r.cost_usd),
                                       "unpriced_requests": r.unpriced_requests} for r in rows]})

    routes = [
        Route("/admin/keys", create, methods=["POST"]), Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/{name}", show, methods=["GET"]), Route("/admin/keys/{name}", revoke, methods=["DELETE"]),
        Route("/admin/spend", spend, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={APIError: _api_error, SelfhostError: _library_error})


class AdminGate:
    """ASGI middleware: /admin/* goes to the admin app once the master key matches; the rest passes on."""

    def __init__(self, app, gateway):
        self.app = app
        self.master_key = os.environ.get(MASTER_KEY_ENV) or None  # read once, at start-up
        self.admin = admin_app(gateway)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/admin/") or self.master_key is None:
            return await self.app(scope, receive, send)
        given = presented_key(scope) or ""
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self.master_key.encode()):
            return await _error(scope, receive, send, APIError(
                f"the admin API needs the master key (${MASTER_KEY_ENV}) as 'Authorization: Bearer <key>'", 401,
                code="invalid_api_key"))
        await self.admin(scope, receive, send)


async def _error(scope, receive, send, err: APIError) -> None:
    await JSONResponse(err.body(), err.status)(scope, receive, send)


# Library errors -> (status, code); the admin app answers each as an OpenAI error object.
_ERRORS = {DuplicateKeyError: (409, "key_exists"), UnknownKeyError: (404, "key_not_found"),
           SelfhostError: (400, "invalid_value")}


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status)


async def _library_error(request: Request, err: SelfhostError) -> JSONResponse:
    status, code = next(_ERRORS[cls] for cls in type(err).__mro__ if cls in _ERRORS)
    return await _api_error(request, APIError(str(err), status, code=code))
