"""Admission: which virtual key a request carries, and whether it may spend what the request may cost.

Checked before any upstream is called: an unknown or revoked key is a 401, a model
outside the key's list a 403, and a request whose estimate does not fit the key's
remaining budget a 429 with OpenAI's `insufficient_quota` code, and one over the key's
requests or tokens per minute a 429 with `rate_limit_exceeded`. Requests without a
virtual key pass unmetered unless `[gateway] require_key` is set.
"""

from __future__ import annotations

import datetime as dt
import time

from selfhost.gateway.budgets import (
    UNMETERED,
    KeyBudgets,
    Reservation,
    estimate_cost,
    estimate_tokens,
)
from selfhost.gateway.deployments import DeploymentTable
from selfhost.gateway.keys import KEY_PREFIX, KeyStore, VirtualKey, digest
from selfhost.gateway.rate_limits import RateLimiter
from selfhost.server.errors import APIError

KEY_CACHE_S = 2.0  # how long a looked-up key is trusted: a revocation takes effect within this


class Admission:
    def __init__(self, keys: KeyStore, budgets: KeyBudgets, table: DeploymentTable, require_key: bool):
        self.keys, self.budgets, self.table, self.require_key = keys, budgets, table, require_key
        self._cache: dict[str, tuple[float, VirtualKey | None]] = {}
        self.rates = RateLimiter()

    def authenticate(self, scope) -> VirtualKey | None:
        """The request's active virtual key; None for a request without one (allowed unless require_key)."""
        given = presented_key(scope)
        if given is None or not given.startswith(KEY_PREFIX):
            if self.require_key:
                raise APIError("this server needs a virtual key: send 'Authorization: Bearer sk-selfhost-...'", 401,
                               code="invalid_api_key")
            return None
        key = self._lookup(given)
        if key is None or not key.is_active:
            raise APIError("unknown or revoked virtual key", 401, code="invalid_api_key")
        return key

    def admit(self, scope, model: str, payload: dict) -> tuple[str | None, Reservation]:
        """(the key's name, its reservation); raises the APIError the client gets."""
        key = self.authenticate(scope)
        if key is None:
            return None, UNMETERED
        if not key.allows(model):
            raise APIError(f"key {key.name!r} may not call model {model!r} (allowed: {', '.join(key.models)})", 403,
                           param="model", code="model_not_allowed")
        rate_entry = None
        if key.rpm is not None or key.tpm is not None:
            rate_entry = self.rates.admit(key.name, key.rpm, key.tpm, sum(estimate_tokens(payload)))
            if isinstance(rate_entry, str):
                raise APIError(f"key {key.name!r} is over its rate limit: {rate_entry}", 429,
                               code="rate_limit_exceeded")
        now = dt.datetime.now(dt.UTC)
        plan, _ = self.table.plan(model)
        estimate = estimate_cost(payload, plan[0].pricer if plan else None, now)
        reservation = self.budgets.admit(key, estimate, now)
        if reservation is None:
            if rate_entry is not None:
                rate_entry.tokens = 0  # refused: it counts as a request, but used no tokens
            raise APIError(f"key {key.name!r} has spent its {key.period} budget of ${key.budget_usd} "
                           f"(${self.budgets.spent(key, now)} spent)", 429, code="insufficient_quota")
        reservation.rate_entry = rate_entry
        return key.name, reservation

    def _lookup(self, given: str) -> VirtualKey | None:
        key_digest = digest(given)
        cached = self._cache.get(key_digest)
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_S:
            return cached[1]
        key = self.keys.find(given)
        self._cache[key_digest] = (time.monotonic(), key)
        return key


def carries_virtual_key(scope) -> bool:
    given = presented_key(scope)
    return given is not None and given.startswith(KEY_PREFIX)


def presented_key(scope) -> str | None:
    headers = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1") or None
