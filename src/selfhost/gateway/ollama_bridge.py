"""Ollama's /api/chat and /api/generate over a remote OpenAI-compatible deployment.

The request is validated by selfhost's own Ollama models (so bad input is the same 400
as for a local model), turned into an OpenAI chat request, sent through the proxy
like any other, and its answer turned back: one JSON object, or NDJSON lines ending
with `done: true` and the token counts. Text only for now: tool calls over a remote
model's Ollama API are refused with a 400.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from selfhost.gateway.proxy import BACKEND_HEADER, COST_HEADER, REQUEST_ID_HEADER
from selfhost.gateway.relay_response import RelayResponse
from selfhost.server.errors import APIError
from selfhost.server.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest

OLLAMA_PATHS = ("/api/chat", "/api/generate")
KEPT_HEADERS = (BACKEND_HEADER, COST_HEADER, REQUEST_ID_HEADER)


def openai_payload(path: str, raw: dict) -> dict:
    """The OpenAI chat request for an Ollama one; an APIError (400) naming the field when it is invalid."""
    try:
        req = (OllamaChatRequest if path == "/api/chat" else OllamaGenerateRequest).model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(f"{field}: {message}" if field else message, param=field, code="invalid_value") from None
    if isinstance(req, OllamaChatRequest):
        if req.tools or any(m.tool_calls or m.role == "tool" for m in req.messages):
            raise APIError("tool calls through a remote model's Ollama API are not supported yet; use /v1/chat/"
                           "completions", param="tools", code="unsupported_parameter")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
    o = req.options
    payload = {"model": req.model, "messages": messages, "stream": req.stream, "temperature": o.temperature,
               "top_p": o.top_p, "presence_penalty": o.presence_penalty, "frequency_penalty": o.frequency_penalty}
    if o.max_tokens is not None:
        payload["max_tokens"] = o.max_tokens
    if o.seed is not None:
        payload["seed"] = o.seed
    if o.stop:
        payload["stop"] = o.stop
    if req.format == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": req.format}}
    if req.stream:  # the counts of the final line come from the usage chunk
        payload["stream_options"] = {"include_usage": True}
    return payload


def ollama_response(path: str, model: str, response: Response) -> Response:
    headers = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
    if isinstance(response, StreamingResponse):
        return RelayResponse(_ndjson(path, model, response.body_iterator), media_type="application/x-ndjson",
                             headers=headers)
    body = json.loads(response.body)
    if response.status_code != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return JSONResponse({"error": message or "the upstream refused the request"}, response.status_code,
                            headers=headers)
    choice = (body.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    return JSONResponse({**_text(path, model, text), **_final(body.get("usage"), choice.get("finish_reason"))},
                        headers=headers)


def _text(path: str, model: str, text: str) -> dict:
    base = {"model": model, "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
    if path == "/api/chat":
        return {**base, "message": {"role": "assistant", "content": text}}
    return {**base, "response": text}


def _final(usage: dict | None, finish_reason: str | None) -> dict:
    usage = usage or {}
    return {"done": True, "done_reason": finish_reason or "stop",
            "prompt_eval_count": usage.get("prompt_tokens", 0), "eval_count": usage.get("completion_tokens", 0)}


async def _ndjson(path: str, model: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE from the proxy's relay -> Ollama's NDJSON lines."""
    usage, finish_reason, pending = None, None, ""
    async for piece in events:
        pending += piece if isinstance(piece, str) else piece.decode()
        *complete, pending = pending.split("\n\n")
        for event in complete:
            if not event.startswith("data: "):
                continue  # the cost comment
            data = event[len("data: "):]
            if data == "[DONE]":
                yield json.dumps({**_text(path, model, ""), **_final(usage, finish_reason)}) + "\n"
                return
            chunk = json.loads(data)
            if "error" in chunk:
                yield json.dumps({"error": chunk["error"].get("message", "upstream error")}) + "\n"
                return
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                finish_reason = choice.get("finish_reason") or finish_reason
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield json.dumps({**_text(path, model, text), "done": False}) + "\n"
