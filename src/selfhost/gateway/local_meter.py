"""Cost and ledger rows for local models: their answers priced from the device's cost per second.

A local `[[models]]` entry's `[models.cost]` names the device and how fast it serves the
model (config.LocalCost); from those `plan.serving_cost` works out, as `selfhost cost`
does, what a second of the device's work costs when it is fully busy (the cost model's
floor). A prompt token then costs that over the prefill speed, a generated one over the
decode speed; a workload of `selfhost cost`'s output share averages to its "best case"
figure. A prompt token the prefix cache held (usage's `cached_tokens`) was not computed:
it costs nothing. Without `[models.cost]` the model is `unpriced`, never $0.

The local routes answer as they always do; this wraps their ASGI `send`. A JSON answer
is held until complete, priced from its `usage`, recorded, then sent with the cost
headers. A stream passes through event by event (the gateway asks for its usage chunk
and drops it unless the client asked too); its cost goes in an SSE comment before
`data: [DONE]`, as for remote streams.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from pathlib import Path

from selfhost.errors import SelfhostError
from selfhost.gateway.config import GatewayConfigError, ModelEntry
from selfhost.gateway.ledger import Ledger, LedgerEntry, new_request_id
from selfhost.gateway.proxy import COST_HEADER, REQUEST_ID_HEADER
from selfhost.gateway.stream_tally import StreamTally
from selfhost.gateway.usage import PricedUsage, usage_record
from selfhost.gateway.wire_json import json_object
from selfhost.plan.pricing import Cost, Unpriced, UsageRecord
from selfhost.plan.serving_cost import ServingSpeed, device_setup, serving_speed


class LocalRate:
    def __init__(self, entry: ModelEntry):
        self.name = entry.name
        self.usd_per_prompt_token = self.usd_per_output_token = None
        self.source = None
        if entry.cost is not None:
            try:
                per_second, speed, self.source = _cost_model(entry)
            except SelfhostError as err:
                raise GatewayConfigError(f"model {entry.name!r}: [models.cost]: {err}") from None
            self.usd_per_prompt_token = per_second / Decimal(repr(speed.prefill_tok_s))
            self.usd_per_output_token = per_second / Decimal(repr(speed.decode_tok_s))

    def describe(self) -> str:
        """What this model's tokens cost, for the start-up banner."""
        if self.usd_per_prompt_token is None:
            return f"local {self.name}: unpriced (no [models.cost])"
        return (f"local {self.name}: ${float(self.usd_per_prompt_token) * 1e6:.4g} per million prompt tokens, "
                f"${float(self.usd_per_output_token) * 1e6:.4g} per million generated ({self.source})")

    def price(self, usage: UsageRecord, estimated: bool) -> PricedUsage:
        model_id = f"local/{self.name}"
        if self.usd_per_prompt_token is None:
            cost = Unpriced(model_id, "no [models.cost] in its [[models]] entry")
            return PricedUsage(usage, cost, estimated)
        # A prompt token read from the prefix cache skipped the prefill: no device time of its own.
        input_usd = Decimal(str(usage.input_tokens - usage.cached_input_tokens)) * self.usd_per_prompt_token
        output_usd = Decimal(str(usage.output_tokens + usage.reasoning_tokens)) * self.usd_per_output_token
        cost = Cost(model_id, input_usd + output_usd, input_usd, output_usd, None, None, self.source)
        return PricedUsage(usage, cost, estimated)


def _cost_model(entry: ModelEntry) -> tuple[Decimal, ServingSpeed, str]:
    """(dollars per busy second, the speeds, where both came from) for a local entry's `[models.cost]`."""
    from selfhost.catalog import get_device
    from selfhost.catalog.references import resolve_model_spec
    from selfhost.plan.cost import SelfHostSetup
    from selfhost.plan.fit import plan_fit
    from selfhost.plan.precision import default_precision, get_precision

    cost = entry.cost
    dev = None
    if cost.device is not None and cost.device.strip().lower() == "local":
        from selfhost.bench.device_probe import measure_local_device

        dev = measure_local_device()
    elif cost.device is not None:
        dev = get_device(cost.device)
    if cost.throughput_tok_s is not None:
        speed = ServingSpeed(cost.throughput_tok_s, cost.throughput_tok_s, "throughput_tok_s (measured)")
    else:  # config.LocalCost checked that a device is named
        spec = resolve_model_spec(entry.path)
        precision = get_precision(cost.quant) if cost.quant else default_precision(dev.kind)
        report = plan_fit(spec, dev, precision, cost.context, cost.concurrency)
        speed = serving_speed(spec, report, precision, Path(cost.bench_result) if cost.bench_result else None)
    # What a busy second costs does not depend on the throughput the setup is given.
    if dev is None:  # config.LocalCost checked that a price or a rent is given
        setup = SelfHostSetup(device_name="the configured device", throughput_tok_s=speed.decode_tok_s,
                              power_w=cost.power_w or 0.0, price_usd=cost.price_usd,
                              rent_usd_per_hour=cost.rent_usd_per_hour, amortisation_years=cost.amortisation_years,
                              electricity_usd_per_kwh=cost.electricity_usd_per_kwh)
    else:
        setup = device_setup(dev, speed.decode_tok_s, cost.price_usd, cost.rent_usd_per_hour, cost.power_w,
                             cost.amortisation_years, cost.electricity_usd_per_kwh)
    bought = (f"rented at ${setup.rent_usd_per_hour:g}/h" if setup.is_rented else
              f"${setup.price_usd:g} over {setup.amortisation_years:g} years + {setup.power_w:g} W")
    source = (f"cost model: {setup.device_name} {bought}; {speed.source}: prefill {speed.prefill_tok_s:,.0f}, "
              f"decode {speed.decode_tok_s:,.1f} tok/s")
    return setup.usd_per_busy_second, speed, source


class LocalMeter:
    def __init__(self, entries: tuple[ModelEntry, ...], ledger: Ledger):
        self.rates = {e.name: LocalRate(e) for e in entries}
        self.ledger = ledger
        self.metrics = None  # GatewayMetrics, attached with the proxy's

    def is_metered(self, name: str) -> bool:
        return name in self.rates

    @staticmethod
    def request_body(payload: dict, endpoint: str) -> dict:
        """The body the local route gets: an OpenAI stream asks for its usage chunk (Ollama's always counts)."""
        if endpoint == "embeddings" or endpoint.startswith("api/") or payload.get("stream") is not True:
            return payload
        options = payload.get("stream_options") if isinstance(payload.get("stream_options"), dict) else {}
        return {**payload, "stream_options": {**options, "include_usage": True}}

    def wrap_send(self, send, name: str, endpoint: str, payload: dict, key_name: str | None, reservation):
        """A `send` that prices, records and labels the local route's answer (`endpoint`: an OpenAI one, or
        Ollama's "api/chat" / "api/generate", whose answers count tokens in their final object)."""
        rate, started = self.rates[name], dt.datetime.now(dt.UTC)
        request_id = new_request_id()
        wants_usage = isinstance(payload.get("stream_options"), dict) and payload["stream_options"].get(
            "include_usage") is True
        ollama = endpoint.startswith("api/")
        read_usage = _ollama_usage if ollama else _openai_usage
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
                state["stream"] = headers.get(b"content-type", b"").startswith(
                    (b"application/x-ndjson", b"text/event-stream"))
                if state["status"] != 200 or state["stream"]:
                    return await send({**message, "headers": [*message.get("headers", []), *labels]})
                state["start"] = message  # held until the body says what it cost
                return None
            if message["type"] != "http.response.body" or state["status"] != 200:
                return await send(message)
            if state["stream"]:
                relay = relay_lines if ollama else relay_events
                return await send({**message, "body": await relay(message.get("body", b""))})
            state["held"].append(message.get("body", b""))
            if message.get("more_body"):
                return None
            body = b"".join(state["held"])
            record_ = read_usage(body)
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

        async def relay_lines(data: bytes) -> bytes:
            """Ollama's NDJSON passes as it is; the last object (`done: true`) carries the counts. NDJSON has no
            comment to put the cost in: it is in the ledger, the metrics and the key's spend."""
            *lines, state["pending"] = (state["pending"] + data).split(b"\n")
            for line in lines:
                if _OLLAMA_DONE.search(line):
                    usage = _ollama_usage(line)
                    await record(rate.price(usage or UsageRecord(), estimated=usage is None), "completed")
            return b"".join(line + b"\n" for line in lines)

        return metered_send


_OLLAMA_DONE = re.compile(rb'"done"\s*:\s*true')


def _openai_usage(body: bytes) -> UsageRecord | None:
    parsed = json_object(body)
    return usage_record(parsed.get("usage")) if parsed is not None else None


def _ollama_usage(body: bytes) -> UsageRecord | None:
    """Ollama's final object counts the prompt (`prompt_eval_count`) and the generated tokens (`eval_count`)."""
    parsed = json_object(body)
    if parsed is None or not isinstance(parsed.get("eval_count"), int):
        return None
    prompt = parsed.get("prompt_eval_count")
    return UsageRecord(input_tokens=prompt if isinstance(prompt, int) else 0, output_tokens=parsed["eval_count"])
