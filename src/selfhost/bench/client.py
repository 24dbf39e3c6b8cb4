"""One streaming request to an OpenAI-compatible endpoint, timed token by token.

Works against `/v1/chat/completions` and `/v1/completions` of any server that
streams Server-Sent Events ending in `data: [DONE]` (selfhost, vLLM, Ollama,
llama.cpp's llama-server, hosted APIs). Every failure becomes a RequestRecord
with an error kind; only cancellation (Ctrl-C) escapes `send`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from selfhost.bench.record import RequestRecord
from selfhost.bench.tokens import TokenCounter
from selfhost.bench.workload import BenchRequest
from selfhost.errors import InvalidParameterError, SelfhostError

APIS = {"chat": "/chat/completions", "completions": "/completions"}

# `owned_by` of /v1/models entries -> serving stack, to label runs without asking.
_OWNERS_TO_BACKEND = {"vllm": "vllm", "llamacpp": "llama.cpp", "library": "ollama", "selfhost": "selfhost"}


class EndpointError(SelfhostError):
    """An endpoint that cannot be reached at all before the benchmark starts."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests. `url` is the API base, e.g.
    http://localhost:8000/v1. `ignore_eos` asks the server to always produce
    max_tokens (vLLM, llama.cpp and selfhost honour it; turn it off for hosted
    APIs that reject unknown fields)."""

    url: str
    model: str
    api: str = "chat"
    api_key: str | None = None
    timeout_s: float = 300.0
    temperature: float = 0.0
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise InvalidParameterError(f"--url {self.url!r} must start with http:// or https://")
        if self.api not in APIS:
            raise InvalidParameterError(f"--api {self.api!r} is not one of {sorted(APIS)}")
        if self.timeout_s <= 0:
            raise InvalidParameterError(f"--timeout {self.timeout_s} must be > 0 seconds")
        if not self.model:
            raise InvalidParameterError("--model must name the served model")

    @property
    def endpoint_url(self) -> str:
        return self.url.rstrip("/") + APIS[self.api]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = request.chat_messages()
        else:
            body["prompt"] = request.prompt_text()
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


class _StreamBroken(Exception):
    """The SSE stream ended early or carried something that is not a chunk."""


def _chunk_text(chunk: dict) -> str:
    """Text carried by one streamed chunk; reasoning text counts as output too."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:  # /v1/completions
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return "".join(delta.get(key) or "" for key in ("content", "reasoning_content", "reasoning"))


class EndpointClient:
    """Holds one connection pool for a whole run; use as an async context manager."""

    def __init__(self, config: EndpointConfig, counter: TokenCounter | None = None) -> None:
        self.config = config
        self.counter = counter
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> EndpointClient:
        timeout = httpx.Timeout(self.config.timeout_s, connect=min(10.0, self.config.timeout_s))
        # No pool cap: the runner decides how many requests are in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.config.headers())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None
        await self._http.aclose()

    async def list_models(self) -> list[dict]:
        """GET /models, to check the endpoint is up and learn its backend. A
        refused connection is a user error; servers without the route give []."""
        assert self._http is not None
        try:
            response = await self._http.get(self.config.url.rstrip("/") + "/models")
        except httpx.HTTPError as err:
            raise EndpointError(f"cannot reach {self.config.url!r}: {err!r}") from None
        if response.status_code != 200:
            return []
        try:
            data = response.json().get("data")
        except (ValueError, AttributeError):
            return []
        return [entry for entry in data or [] if isinstance(entry, dict)]

    async def send(self, request: BenchRequest, zero_s: float) -> RequestRecord:
        """Send one request; `zero_s` is the level's start on time.perf_counter()."""
        assert self._http is not None
        start_s = time.perf_counter()
        chunk_times: list[float] = []
        texts: list[str] = []
        usage: dict = {}
        status: int | None = None
        error: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self._http.stream(
                    "POST", self.config.endpoint_url, json=self.config.payload(request)
                ) as response:
                    status = response.status_code
                    if status >= 400:
                        error = ("http", f"HTTP {status}: {_error_message(await response.aread())}")
                    else:
                        usage = await self._read_stream(response, chunk_times, texts)
        except (TimeoutError, httpx.TimeoutException):
            error = ("timeout", f"no complete reply within {self.config.timeout_s:g} s")
        except httpx.ConnectError as err:
            error = ("connect", repr(err))
        except (_StreamBroken, httpx.RemoteProtocolError, httpx.ReadError) as err:
            error = ("stream", str(err) or repr(err))
        except httpx.HTTPError as err:
            error = ("transport", repr(err))
        end_s = time.perf_counter()
        return self._record(request, zero_s, start_s, end_s, status, error, chunk_times, texts, usage)

    async def _read_stream(self, response: httpx.Response, chunk_times: list[float], texts: list[str]) -> dict:
        usage: dict = {}
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return usage
            try:
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _StreamBroken(f"error event in stream: {str(chunk['error'])[:200]}")
                text = _chunk_text(chunk)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                raise _StreamBroken(f"malformed chunk {data[:80]!r}: {err}") from None
            if text:
                chunk_times.append(time.perf_counter())
                texts.append(text)
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
        raise _StreamBroken("stream ended without data: [DONE]")

    def _record(
        self,
        request: BenchRequest,
        zero_s: float,
        start_s: float,
        end_s: float,
        status: int | None,
        error: tuple[str, str] | None,
        chunk_times: list[float],
        texts: list[str],
        usage: dict,
    ) -> RequestRecord:
        prompt_tokens = usage.get("prompt_tokens")
        output_tokens = usage.get("completion_tokens")
        source = "usage"
        if not isinstance(output_tokens, int):
            if self.counter is not None:
                source = "tokenizer"
                output_tokens = self.counter.count("".join(texts))
                prompt_tokens = sum(self.counter.count(content) for _, content in request.messages)
            else:
                source = "chunks"
                output_tokens = len(texts)
                prompt_tokens = request.planned_prompt_tokens
        ttft_s = chunk_times[0] - start_s if chunk_times else None
        itl_s = tuple(b - a for a, b in zip(chunk_times, chunk_times[1:]))
        return RequestRecord(
            index=request.index,
            start_s=start_s - zero_s,
            end_s=end_s - zero_s,
            error=error[0] if error else None,
            error_detail=error[1] if error else None,
            status_code=status,
            ttft_s=ttft_s,
            itl_s=itl_s,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            output_tokens=output_tokens,
            tokens_source=source,
        )


def _error_message(body: bytes) -> str:
    """The message of an error response: OpenAI's {"error": {"message"}}, Ollama's {"error": "..."}, else the
    body's start. Reports count failures by this text, so it must not carry the whole JSON envelope."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:200]
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    return error[:300] if isinstance(error, str) else text[:200]


def served_context(models: list[dict], model: str) -> int | None:
    """Context window of `model` as /v1/models reports it (`max_model_len`, as vLLM and selfhost
    name it), or None when the server does not say."""
    for entry in models:
        value = entry.get("max_model_len")
        if entry.get("id") == model and isinstance(value, int) and value > 0:
            return value
    return None


def detect_backend(models: list[dict]) -> str | None:
    """Name the serving stack from /v1/models `owned_by`, or None if unknown."""
    for entry in models:
        backend = _OWNERS_TO_BACKEND.get(str(entry.get("owned_by", "")).lower())
        if backend:
            return backend
    return None
