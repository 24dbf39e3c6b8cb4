"""Cost and ledger rows for local models: their answers priced from the device's cost per hour.

A local `[[models]]` entry may give `usd_per_hour` (the device's rent, or its price
amortised plus power: what `selfhost cost` works from) and `throughput_tok_s` (tokens,
prompt and generated, the device completes per second when busy). A token then costs
usd_per_hour / (throughput_tok_s * 3600): the cost model's floor, the device fully
busy. Without both the model is `unpriced`, never $0.

The local routes answer as they always do; this wraps their ASGI `send`. A JSON answer
is held until complete, priced from its `usage`, recorded, then sent with the cost
headers. A stream passes through event by event (the gateway asks for its usage chunk
and drops it unless the client asked too); its cost goes in an SSE comment before
`data: [DONE]`, as for remote streams.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

from selfhost.gateway.config import ModelEntry
from selfhost.gateway.ledger import Ledger, LedgerEntry, new_request_id
from selfhost.gateway.proxy import COST_HEADER, REQUEST_ID_HEADER
from selfhost.gateway.stream_tally import StreamTally
from selfhost.gateway.usage import PricedUsage, usage_record
from selfhost.plan.pricing import Cost, Unpriced, UsageRecord


class LocalRate:
    def __init__(self, entry: ModelEntry):
        self.name = entry.name
        self.usd_per_token = (None if entry.usd_per_hour is None else
                              Decimal(str(entry.usd_per_hour)) / (Decimal(str(entry.throughput_tok_s)) * 3600))
        self.source = (f"cost model: ${entry.usd_per_hour}/h at {entry.throughput_tok_s} tok/s"
                       if entry.usd_per_hour is not None else None)

    def price(self, usage: UsageRecord, estimated: bool) -> PricedUsage:
        model_id = f"local/{self.name}"
        if self.usd_per_token is None:
            cost = Unpriced(model_id, "no usd_per_hour and throughput_tok_s in its [[models]] entry")
            return PricedUsage(usage, cost, estimated)
        input_usd = Decimal(str(usage.input_tokens)) * self.usd_per_token
        output_usd = Decimal(str(usage.output_tokens + usage.reasoning_tokens)) * self.usd_per_token
        cost = Cost(model_id, input_usd + output_usd, input_usd, output_usd, None, None, self.source)
        return PricedUsage(usage, cost, estimated)


class LocalMeter:
    def __init__(self, entries: tuple[ModelEntry, ...], ledger: Ledger):
        self.rates = {e.name: LocalRate(e) for e in entries}
        self.ledger = ledger
        self.metrics = None  # GatewayMetrics, attached with the proxy's

    def is_metered(self, name: str) -> bool:
        return name in self.rates

    @staticmethod
    def request_body(payload: dict, endpoint: str) -> dict:
        """The body the local route gets: a stream asks for its usage chunk."""
        if endpoint == "embeddings" or payload.get("stream") is not True:
            return payload
        options = payload.get("stream_options") if isinstance(payload.get("stream_options"), dict) else {}
        return {**payload, "stream_options": {**options, "include_usage": True}}

    def wrap_send(self, send, name: str, endpoint: str, payload: dict, key_name: str | None, reservation):
        """A `send` that prices, records and labels the local route's answer."""
        rate, started = self.rates[name], dt.datetime.now(dt.UTC)
        request_id = new_request_id()
        wants_usage = isinstance(payload.get("stream_options"), dict) and payload["stream_options"].get(
            "include_usage") is True
        state = {"status": 0, "stream": False, "start": None, "held": [], "pending": b""}
        tally = StreamTally(payload)
        labels = [(REQUEST_ID_HEADER.encode(), request_id.encode())]  # the router names the backend

        async def record(priced: PricedUsage, status: str) -> None:
            entry = LedgerEntry(request_id, started, key_name, name, f"local/{name}", name, endpoint, status, priced)
            await self.ledger.record(entry)
            usage = priced.usage
            reservation.settle(priced.cost.usd if priced.cost.is_priced else None,
                               int(usage.input_tokens + usage.output_tokens + usage.reasoning_tokens))
            if self.metrics is not None:
                self.metrics.observe(entry)

        async def metered_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = dict(message.get("headers", []))
                state["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if state["status"] != 200 or state["stream"]:
                    return await send({**message, "headers": [*message.get("headers", []), *labels]})
                state["start"] = message  # held until the body says what it cost
                return None
            if message["type"] != "http.response.body" or state["status"] != 200:
                return await send(message)
            if state["stream"]:
                return await send({**message, "body": await relay_events(message.get("body", b""))})
            state["held"].append(message.get("body", b""))
            if message.get("more_body"):
                return None
            body = b"".join(state["held"])
            record_ = _json_usage(body)
            priced = rate.price(record_ or UsageRecord(), estimated=record_ is None)
            await record(priced, "completed")
            start = state["start"]
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers += [*labels, (COST_HEADER.encode(), priced.header.encode()),
                        (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        async def relay_events(data: bytes) -> bytes:
            *events, state["pending"] = (state["pending"] + data).split(b"\n\n")
            out = []
            for event in events:
                text = event.decode()
                if text.startswith("data: ") and text[6:] != "[DONE]":
                    chunk = tally.observe(text[6:])
                    if tally.is_usage_only(chunk) and not wants_usage:
                        continue
                elif text == "data: [DONE]":
                    priced = tally.priced_by(rate)
                    await record(priced, "completed")
                    out.append(f": {COST_HEADER}={priced.header}".encode())
                out.append(event)
            return b"".join(e + b"\n\n" for e in out)

        return metered_send


def _json_usage(body: bytes) -> UsageRecord | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return usage_record(parsed.get("usage")) if isinstance(parsed, dict) else None
