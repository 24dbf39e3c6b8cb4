"""Ollama-compatible routes: /api/chat and /api/generate (NDJSON streams), tags, show, ps, version.

Existing Ollama clients (the `ollama` Python package, Open WebUI...) point at this
server unchanged. Errors under /api use Ollama's `{"error": "message"}` shape.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import selfhost
from selfhost.errors import SelfhostError
from selfhost.server.errors import APIError, OllamaErrorBody, documented_errors, from_selfhost_error
from selfhost.structured_output import StructuredOutput
from selfhost.tools.calls import ToolChoice, check_tools
from selfhost.tools.model_tools import OutputSplitter
from selfhost.server.ollama_protocol import (
    OllamaBase, OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest, now_iso,
)
from selfhost.server.serving import Generation, Serving, error_body, event_stream, unless_disconnected

router = APIRouter(prefix="/api", tags=["ollama"], responses=documented_errors(OllamaErrorBody))


def _line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def _ndjson_error(err: Exception) -> str:
    return _line({"error": error_body(err)["error"]["message"]})


async def _prepare(serving: Serving, req: OllamaBase, served, prompt_ids: list[int],
                   constraint: StructuredOutput | None = None, constraint_param: str = "format") -> Generation:
    keep_alive = req.keep_alive_s()
    if keep_alive is not None and not served.pinned:
        served.keep_alive_s = keep_alive
    constraint = constraint or req.structured_output()
    return await serving.prepare(served, [prompt_ids], req.options.max_tokens,
                                 lambda max_tokens, i: req.options.sampling_params(max_tokens, constraint),
                                 max_tokens_param="options.num_predict", constraint_param=constraint_param)


def _final_fields(gen: Generation, first_token_ns: int | None, eval_count: int, reason: str | None) -> dict:
    total = time.perf_counter_ns() - int(gen.started * 1e9)
    prompt_ns = first_token_ns or total
    return {
        "done": True, "done_reason": "stop" if reason in (None, "abort") else reason,
        "total_duration": total, "load_duration": 0,
        "prompt_eval_count": gen.num_prompt_tokens, "prompt_eval_duration": prompt_ns,
        "eval_count": eval_count, "eval_duration": max(total - prompt_ns, 0),
    }


class _TextBody:
    """What each line of a plain generation carries: the new text, under the route's key."""

    def __init__(self, wrap):
        self.wrap = wrap  # text -> the line's body, e.g. {"response": text}

    def delta(self, delta) -> dict | None:
        return self.wrap(delta.text) if delta.text else None

    def whole(self, text: str, token_ids: list[int]) -> dict:
        return self.wrap(text)

    def last(self) -> dict:
        return self.wrap("")


class _ToolCallBody:
    """`/api/chat` with tools: text is held while it may be a call; the calls (arguments as objects,
    Ollama's way) go in the line that ends the output."""

    def __init__(self, tools):
        self.tools, self.output = tools, OutputSplitter(tools)

    def delta(self, delta) -> dict | None:
        content, calls = self.output.feed(delta)
        return _chat_message(content, calls) if content or calls else None

    def whole(self, text: str, token_ids: list[int]) -> dict:
        parsed = self.tools.parse(token_ids)
        return _chat_message(parsed.content if parsed.calls else text, parsed.calls)

    def last(self) -> dict:
        return _chat_message("", [])


def _chat_message(content: str, calls) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_dict}} for c in calls]
    return {"message": message}


async def _lines(serving: Serving, gen: Generation, model: str, body) -> AsyncIterator[str]:
    """NDJSON: one line per delta with something to say, then the final line with counts and durations (ns)."""
    first_ns, count, reason = None, 0, None
    async for _, delta in serving.run(gen):
        if first_ns is None:
            first_ns = time.perf_counter_ns() - int(gen.started * 1e9)
        count, reason = delta.num_output_tokens, delta.finish_reason
        line = body.delta(delta)
        if line is not None:
            yield _line({"model": model, "created_at": now_iso(), **line, "done": False})
    yield _line({"model": model, "created_at": now_iso(), **body.last(), **_final_fields(gen, first_ns, count, reason)})


async def _whole(serving: Serving, gen: Generation, model: str, body) -> dict:
    """`stream: false`: one object with the whole text and the final counts."""
    first_ns, text, token_ids, count, reason = None, [], [], 0, None
    async with aclosing(serving.run(gen)) as deltas:
        async for _, delta in deltas:
            first_ns = first_ns or time.perf_counter_ns() - int(gen.started * 1e9)
            text.append(delta.text)
            token_ids += delta.token_ids
            count, reason = delta.num_output_tokens, delta.finish_reason
    return {"model": model, "created_at": now_iso(), **body.whole("".join(text), token_ids),
            **_final_fields(gen, first_ns, count, reason)}


async def _respond(request: Request, serving: Serving, req: OllamaBase, gen: Generation, body):
    if req.stream:
        events = event_stream(request, _lines(serving, gen, req.model, body), _ndjson_error)
        return StreamingResponse(events, media_type="application/x-ndjson")
    return await unless_disconnected(request, _whole(serving, gen, req.model, body))


def _loaded(model: str, body: dict) -> dict:
    return {"model": model, "created_at": now_iso(), **body, "done": True, "done_reason": "load"}


@router.post("/chat")
async def chat(req: OllamaChatRequest, request: Request):
    serving: Serving = request.app.state.serving
    served = await serving.model(req.model)
    if not req.messages:  # Ollama's way to just load a model
        return _loaded(req.model, {"message": {"role": "assistant", "content": ""}})
    tools = [t.spec() for t in req.tools or []]
    try:
        check_tools(tools, ToolChoice("auto"))
    except SelfhostError as err:
        raise from_selfhost_error(err) from err
    prompt_ids = await serving.tokenize_chat(served, [m.as_dict() for m in req.messages], tools)
    if not tools:
        gen = await _prepare(serving, req, served, prompt_ids)
        return await _respond(request, serving, req, gen, _TextBody(lambda text: _chat_message(text, [])))
    # Ollama has no tool_choice: the model decides, and a call it opens is constrained to its schema.
    gen = await _prepare(serving, req, served, prompt_ids, served.tools.constraint(tools, ToolChoice("auto")), "tools")
    return await _respond(request, serving, req, gen, _ToolCallBody(served.tools))


@router.post("/generate")
async def generate(req: OllamaGenerateRequest, request: Request):
    serving: Serving = request.app.state.serving
    served = await serving.model(req.model)
    if not req.prompt:
        return _loaded(req.model, {"response": ""})
    if not req.raw and served.llm.tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        prompt_ids = await serving.tokenize_chat(served, messages)
    else:
        prompt_ids = await serving.tokenize(served, f"{req.system}\n{req.prompt}" if req.system else req.prompt)
    gen = await _prepare(serving, req, served, prompt_ids)
    return await _respond(request, serving, req, gen, _TextBody(lambda text: {"response": text}))


# -- model information --------------------------------------------------------------

def _details(served) -> dict:
    spec = served.llm.model.spec
    params = served.num_params
    # A quantized folder names its method (INT4, INT8); otherwise the dtype the weights run in (FLOAT32, BFLOAT16).
    level = served.quantization or str(served.llm.dtype).removeprefix("torch.")
    return {
        "parent_model": "", "format": "safetensors", "family": spec.architecture, "families": [spec.architecture],
        "parameter_size": f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M",
        "quantization_level": level.upper(),
    }


def _digest(served) -> str:
    return hashlib.sha256(f"{served.name}:{served.ref}".encode()).hexdigest()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


@router.get("/tags")
async def tags(request: Request) -> dict:
    models = request.app.state.models.models.values()
    return {"models": [
        {"name": m.name, "model": m.name, "modified_at": _iso(m.loaded_at), "size": m.weight_bytes,
         "digest": _digest(m), "details": _details(m)}
        for m in models
    ]}


@router.get("/ps")
async def ps(request: Request) -> dict:
    models = request.app.state.models.models.values()
    far_future = time.time() + 10 * 365 * 86400  # pinned models never expire
    return {"models": [
        {"name": m.name, "model": m.name, "size": m.memory_bytes, "digest": _digest(m), "details": _details(m),
         "expires_at": _iso(m.expires_at or far_future),
         "size_vram": m.memory_bytes if m.llm.device.type == "cuda" else 0, "context_length": m.llm.max_model_len}
        for m in models
    ]}


@router.post("/show")
async def show(req: OllamaShowRequest, request: Request) -> dict:
    served = request.app.state.models.models.get(req.model_name.removesuffix(":latest"))
    if served is None:
        raise APIError(f"model {req.model_name!r} not found", 404, param="model", code="model_not_found")
    spec = served.llm.model.spec
    tokenizer = served.llm.tokenizer
    return {
        "modelfile": f"# served by selfhost\nFROM {served.ref or served.name}\n",
        "parameters": "", "template": tokenizer.hf.chat_template or "",
        "details": _details(served),
        "model_info": {
            "general.architecture": spec.architecture, "general.parameter_count": served.num_params,
            f"{spec.architecture}.context_length": served.llm.max_model_len,
            f"{spec.architecture}.embedding_length": spec.hidden_size,
            f"{spec.architecture}.block_count": spec.num_layers,
        },
        "capabilities": ["completion"],
        "modified_at": _iso(served.loaded_at),
    }


@router.get("/version")
async def version() -> dict:
    return {"version": selfhost.__version__}
