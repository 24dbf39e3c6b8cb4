"""JSON on the gateway's hot path: orjson where installed, the standard library where not, or where orjson
refuses what the standard library reads.

Each proxied request parses the client's body and the upstream's answer and writes the
upstream's body: with the standard library that was ~11 us of the gateway's CPU a request
on the 2-core VM, with orjson ~2 us. orjson is stricter (no NaN or Infinity, integers
within 64 bits): whatever it refuses goes through `json` as before, so nothing that
parsed before fails now.
"""

from __future__ import annotations

import json

try:
    import orjson
except ImportError:  # an optional speed-up (the gateway extra installs it)
    orjson = None


def loads(data: bytes | str):
    """The value of a JSON text; raises ValueError when it is not JSON (as json.loads does)."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:  # a ValueError: maybe JSON that only json reads
            pass
    return json.loads(data)


def json_object(body: bytes) -> dict | None:
    """The body as a JSON object; None when it is not one (whoever reads it says what is wrong with it)."""
    try:
        payload = loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def dumps(value) -> bytes:
    """`value` as UTF-8 JSON text."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:  # an integer past 64 bits, a subclass orjson does not take
            pass
    return json.dumps(value).encode()
