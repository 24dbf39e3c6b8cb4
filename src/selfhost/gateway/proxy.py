"""Forwarding one OpenAI request to remote deployments: retries before the first byte, relay after it.

A request walks the deployment plan (deployments/DeploymentTable.plan). A connect
error, a timeout, a 429 or a 5xx before the upstream's first byte cools that
deployment down and moves on, with a growing pause, at most `max_attempts` times;
when every remote attempt failed and the plan ends in a local model, the request is
handed back to selfhost's own routes (LocalFallback). Once a stream's first event
has reached the client, nothing is retried: an upstream failure ends the stream with
an error event, and the ledger charges the tokens the client received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from starlette.responses import Response, StreamingResponse

from selfhost.gateway import wire_json
from selfhost.gateway.budgets import UNMETERED, Reservation
from selfhost.gateway.config import GatewaySettings
from selfhost.gateway.deployments import Deployment, DeploymentTable
from selfhost.gateway.lean_http import LeanPool, LeanResponse
from selfhost.gateway.ledger import Ledger, LedgerEntry, new_request_id
from selfhost.gateway.metrics import GatewayMetrics
from selfhost.gateway.relay_response import RelayResponse
from selfhost.gateway.stream_tally import StreamTally
from selfhost.gateway.upstream_http import (
    TRANSPORT_ERRORS,
    StreamCutShort,
    failure_name,
    open_session,
    sse_batches,
)
from selfhost.gateway.usage import PricedUsage, price, usage_record
from selfhost.plan.pricing import UsageRecord
from selfhost.server.errors import APIError

log = logging.getLogger("selfhost.gateway")

BACKEND_HEADER = "x-selfhost-backend"
COST_HEADER = "x-selfhost-cost-usd"
REQUEST_ID_HEADER = "x-selfhost-request-id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RetryableFailure(Exception):
    """An upstream failed before its first byte: the next deployment may answer instead."""


@dataclass(frozen=True)
class LocalFallback:
    """Every remote attempt failed; serve the request with this local model."""

    name: str


@dataclass(frozen=True)
class ProxyRequest:
    endpoint: str  # "chat/completions", "completions" or "embeddings"
    payload: dict  # the client's JSON body
    key_name: str | None = None  # the virtual key's name
    reservation: Reservation = field(default_factory=lambda: UNMETERED)  # settled with the real cost once the ledger has it

    @property
    def model(self) -> str:
        return self.payload["model"]

    @property
    def is_stream(self) -> bool:
        return self.endpoint != "embeddings" and self.payload.get("stream") is True

    @property
    def wants_usage_chunk(self) -> bool:
        options = self.payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def upstream_payload(self, deployment: Deployment) -> dict:
        payload = {**self.payload, "model": deployment.model}
        if self.is_stream:  # the usage chunk is how a stream's cost is known exactly
            options = self.payload.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return payload


class Proxy:
    """One shared HTTP session (pooled keep-alive connections) for every deployment, opened by start()."""

    def __init__(self, table: DeploymentTable, settings: GatewaySettings, ledger: Ledger):
        self.table, self.settings, self.ledger = table, settings, ledger
        self.client: aiohttp.ClientSession | None = None
        self.lean: LeanPool | None = None  # plain-http upstreams without a proxy (lean_http); aiohttp for the rest
        self._background: set[asyncio.Task] = set()
        self.metrics: GatewayMetrics | None = None  # attached by the app, onto the server's registry

    def start(self) -> None:
        self.client = open_session(self.settings.timeout_s, self.settings.connect_timeout_s)
        self.lean = LeanPool(self.settings.timeout_s, self.settings.connect_timeout_s)

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.lean is not None:
            self.lean.close()
        if self.client is not None:
            await self.client.close()

    async def handle(self, request: ProxyRequest) -> Response | LocalFallback:
        plan, local_fallback = self.table.plan(request.model)
        failures: list[str] = []
        for attempt, deployment in enumerate(plan[:self.settings.max_attempts]):
            if attempt:
                await asyncio.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
            deployment.begin()
            streaming = False  # once a stream is handed to the client, its relay ends the deployment's count
            try:
                if request.is_stream:
                    response = await self._open_stream(deployment, request)
                    streaming = isinstance(response, StreamingResponse)
                    return response
                return await self._complete(deployment, request)
            except RetryableFailure as failure:
                deployment.mark_failed(self.settings.cooldown_s)
                failures.append(f"{deployment.id}: {failure}")
                if self.metrics is not None:
                    self.metrics.upstream_failures.labels(deployment.id).inc()
                log.warning("deployment %s failed before its first byte (%s); trying the next", deployment.id,
                            failure)
            finally:
                if not streaming:
                    deployment.end()
        if local_fallback is not None:
            return LocalFallback(local_fallback)
        tried = "; ".join(failures) or "every deployment is at its max_concurrency"
        raise APIError(f"no deployment of model {request.model!r} could answer ({tried})", 502,
                       param="model", code="upstream_unavailable")

    # -- one attempt -------------------------------------------------------------

    def _url(self, deployment: Deployment, request: ProxyRequest) -> str:
        return f"{deployment.url}/{request.endpoint}"

    async def _post(self, deployment: Deployment, request: ProxyRequest) -> aiohttp.ClientResponse | LeanResponse:
        """The upstream's answer, its body not read yet (the caller releases it)."""
        payload = wire_json.dumps(request.upstream_payload(deployment))
        try:
            if LeanPool.serves(deployment.url, deployment.via_proxy):
                return await self.lean.post(self._url(deployment, request), payload, deployment.headers)
            return await self.client.post(self._url(deployment, request), data=payload, headers=deployment.headers,
                                          **deployment.via_proxy)
        except TRANSPORT_ERRORS as err:  # connect error, timeout, dropped connection
            raise RetryableFailure(failure_name(err)) from None

    async def _complete(self, deployment: Deployment, request: ProxyRequest) -> Response:
        started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
        upstream = await self._post(deployment, request)
        try:
            content = await upstream.read()
        except TRANSPORT_ERRORS as err:
            raise RetryableFailure(failure_name(err)) from None
        finally:
            upstream.release()
        deployment.observe_latency(time.perf_counter() - clock)
        _raise_if_retryable(upstream.status)
        if upstream.status != 200:
            return _passed_through(deployment, upstream.status, content)
        try:
            body = wire_json.loads(content)
        except ValueError:
            raise RetryableFailure("a 200 whose body is not JSON") from None
        deployment.mark_healthy()
        record = usage_record(body.get("usage") if isinstance(body, dict) else None)
        priced = price(record or UsageRecord(), deployment.pricer, started, estimated=record is None)
        request_id = await self._record(request, deployment, started, "completed", priced)
        return Response(content, 200, media_type="application/json",
                        headers=_served_headers(deployment, request_id, priced))

    async def _open_stream(self, deployment: Deployment, request: ProxyRequest) -> Response:
        started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
        upstream = await self._post(deployment, request)
        if upstream.status != 200:
            content = await _read_and_close(upstream)
            _raise_if_retryable(upstream.status)
            return _passed_through(deployment, upstream.status, content)
        batches = sse_batches(upstream.content.iter_any())
        try:  # the first event decides: nothing has reached the client yet
            first = await anext(batches)
        except (*TRANSPORT_ERRORS, StopAsyncIteration) as err:
            upstream.close()
            raise RetryableFailure(f"stream ended before its first event ({failure_name(err)})") from None
        deployment.observe_latency(time.perf_counter() - clock)  # time to the first event
        deployment.mark_healthy()
        request_id = new_request_id()
        relay = self._relay(deployment, request, request_id, started, upstream, first, batches)
        headers = {**SSE_HEADERS, BACKEND_HEADER: deployment.id, REQUEST_ID_HEADER: request_id}
        return RelayResponse(relay, media_type="text/event-stream", headers=headers)

    async def _relay(self, deployment: Deployment, request: ProxyRequest, request_id: str, started: dt.datetime,
                     upstream: aiohttp.ClientResponse, first: list[bytes],
                     batches: AsyncIterator[list[bytes]]) -> AsyncIterator[bytes]:
        """The upstream's events as they come, those of one network read in one write (never held back)."""
        tally = StreamTally(request.payload)
        finished = False
        try:
            batch, done = first, False
            while True:
                out = []
                for data in batch:
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = tally.observe(data)
                    if not (tally.is_usage_only(chunk) and not request.wants_usage_chunk):
                        out.append(b"data: " + data + b"\n\n")
                if out:
                    yield b"".join(out)
                if done:
                    break
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:  # closed without [DONE]: the upstream died mid-way
                    raise StreamCutShort("upstream closed the stream before [DONE]") from None
            upstream.release()
            priced = tally.priced(deployment.pricer, started)
            await self._record(request, deployment, started, "completed", priced, request_id)
            finished = True
            # Headers left before the cost was known: it travels as an SSE comment, which clients skip.
            yield f": {COST_HEADER}={priced.header}\n\ndata: [DONE]\n\n".encode()
        except TRANSPORT_ERRORS as err:
            log.warning("deployment %s failed mid-stream (%s); ending the stream", deployment.id, failure_name(err))
            upstream.close()
            priced = tally.priced(deployment.pricer, started)
            await self._record(request, deployment, started, "interrupted", priced, request_id)
            finished = True
            error = APIError(f"upstream {deployment.id} failed mid-stream ({failure_name(err)}); the response is "
                             "incomplete", 502, code="upstream_interrupted")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            deployment.end()
            if not finished:  # the client went away (cancelled): close and record off this cancelled task
                task = asyncio.get_running_loop().create_task(
                    self._finish_abandoned(request, deployment, started, upstream, tally, request_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _finish_abandoned(self, request, deployment, started, upstream, tally, request_id) -> None:
        upstream.close()  # mid-stream: the connection cannot be reused
        await self._record(request, deployment, started, "client_disconnected",
                           tally.priced(deployment.pricer, started), request_id)

    async def _record(self, request: ProxyRequest, deployment: Deployment, started: dt.datetime, status: str,
                      priced: PricedUsage, request_id: str | None = None) -> str:
        request_id = request_id or new_request_id()
        entry = LedgerEntry(
            request_id=request_id, time=started, key_name=request.key_name, model=request.model,
            deployment=deployment.id, upstream_model=deployment.model, endpoint=request.endpoint, status=status,
            priced=priced)
        await self.ledger.record(entry)
        if self.metrics is not None:
            self.metrics.observe(entry)
        request.reservation.settle(priced.cost.usd if priced.cost.is_priced else None, _tokens(priced))
        return request_id


def _tokens(priced: PricedUsage) -> int:
    usage = priced.usage
    return int(usage.input_tokens + usage.output_tokens + usage.reasoning_tokens)


def _raise_if_retryable(status: int) -> None:
    if status == 429 or status >= 500:
        raise RetryableFailure(f"HTTP {status}")


def _passed_through(deployment: Deployment, status: int, content: bytes) -> Response:
    """An upstream's own 4xx answer. A rejected gateway credential is the operator's problem, not the client's."""
    if status in (401, 403):
        raise APIError(f"deployment {deployment.id} rejected the gateway's credentials (HTTP {status}); check its "
                       "api_key_env", 502, code="upstream_auth_failed")
    return Response(content, status, media_type="application/json", headers={BACKEND_HEADER: deployment.id})


def _served_headers(deployment: Deployment, request_id: str, priced: PricedUsage) -> dict:
    return {BACKEND_HEADER: deployment.id, COST_HEADER: priced.header, REQUEST_ID_HEADER: request_id}


async def _read_and_close(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except TRANSPORT_ERRORS:
        return b""
    finally:
        upstream.release()
