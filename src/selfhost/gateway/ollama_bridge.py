"""Ollama's /api/chat and /api/generate over a remote OpenAI-compatible deployment.

The request is validated by selfhost's own Ollama models (so bad input is the same 400
as for a local model), turned into an OpenAI chat request, sent through the proxy
like any other, and its answer turned back: one JSON object, or NDJSON lines ending
with `done: true` and the token counts.

Tools go both ways. Ollama's tool definitions are OpenAI's; its calls carry their
arguments as an object and no id, and a tool's answer names the function
(`tool_name`), not a call. So the assistant turns' calls get ids (`call_<turn>_<n>`)
and each tool turn the id of the earliest unanswered call of its function (of any
function without `tool_name`); an answer's calls come back with their arguments
parsed, a stream's once its arguments are whole (OpenAI streams them in pieces).
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
    tools = None
    if isinstance(req, OllamaChatRequest):
        messages = _openai_messages(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
    o = req.options
    payload = {"model": req.model, "messages": messages, "stream": req.stream, "temperature": o.temperature,
               "top_p": o.top_p, "presence_penalty": o.presence_penalty, "frequency_penalty": o.frequency_penalty}
    if tools:
        payload["tools"] = tools
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


def _openai_messages(messages) -> list[dict]:
    """Ollama's chat turns as OpenAI's: calls get ids, and each tool turn the id of the call it answers."""
    out, unanswered = [], []  # unanswered: (call id, function name), oldest first
    for turn, m in enumerate(messages):
        message = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = [{"id": f"call_{turn}_{n}", "type": "function",
                      "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)}}
                     for n, c in enumerate(m.tool_calls)]
            message["tool_calls"] = calls
            unanswered += [(c["id"], c["function"]["name"]) for c in calls]
        if m.role == "tool":
            match = next((i for i, (_, name) in enumerate(unanswered) if m.tool_name in (None, name)), None)
            if match is None:
                raise APIError(f"messages[{turn}]: a tool result"
                               + (f" of {m.tool_name!r}" if m.tool_name else "")
                               + " that answers no earlier tool call", param=f"messages.{turn}", code="invalid_value")
            message["tool_call_id"] = unanswered.pop(match)[0]
        out.append(message)
    return out


def _ollama_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls -> Ollama's: the arguments as an object (left as the text where it is not JSON)."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


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
    message = choice.get("message") or {}
    answer = _text(path, model, message.get("content") or "", _ollama_calls(message.get("tool_calls") or []))
    return JSONResponse({**answer, **_final(body.get("usage"), choice.get("finish_reason"))}, headers=headers)


def _text(path: str, model: str, text: str, calls: list[dict] | None = None) -> dict:
    base = {"model": model, "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
    if path == "/api/chat":
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {**base, "message": message}
    return {**base, "response": text}


def _final(usage: dict | None, finish_reason: str | None) -> dict:
    usage = usage or {}
    return {"done": True, "done_reason": finish_reason or "stop",
            "prompt_eval_count": usage.get("prompt_tokens", 0), "eval_count": usage.get("completion_tokens", 0)}


async def _ndjson(path: str, model: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE from the proxy's relay -> Ollama's NDJSON lines."""
    usage, finish_reason, pending = None, None, ""
    calls: dict[int, dict] = {}  # a streamed call's pieces by its index, joined before the final line
    async for piece in events:
        pending += piece if isinstance(piece, str) else piece.decode()
        *complete, pending = pending.split("\n\n")
        for event in complete:
            if not event.startswith("data: "):
                continue  # the cost comment
            data = event[len("data: "):]
            if data == "[DONE]":
                if calls:
                    whole = [{"function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                             for _, c in sorted(calls.items())]
                    yield json.dumps({**_text(path, model, "", _ollama_calls(whole)), "done": False}) + "\n"
                yield json.dumps({**_text(path, model, ""), **_final(usage, finish_reason)}) + "\n"
                return
            chunk = json.loads(data)
            if "error" in chunk:
                yield json.dumps({"error": chunk["error"].get("message", "upstream error")}) + "\n"
                return
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                finish_reason = choice.get("finish_reason") or finish_reason
                for piece in (choice.get("delta") or {}).get("tool_calls") or ():
                    call = calls.setdefault(piece.get("index", 0), {"name": "", "arguments": []})
                    function = piece.get("function") or {}
                    call["name"] = function.get("name") or call["name"]
                    call["arguments"].append(function.get("arguments") or "")
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield json.dumps({**_text(path, model, text), "done": False}) + "\n"
