"""Anthropic Messages API: POST /v1/messages (whole or as Anthropic's server-sent events) and count_tokens.

Requests become API-neutral messages and tools (selfhost.tools), so the model's own
tool-call format and grammar serve them as they serve OpenAI's chat completions.
Errors under /v1/messages have Anthropic's shape (errors.py picks it by path).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from selfhost.errors import SelfhostError
from selfhost.server.anthropic_protocol import (
    AnthropicUsage, CountTokensRequest, MessageResponse, MessagesRequest, TextBlock, TokenCount, ToolUseBlock,
    message_id, tool_use_id,
)
from selfhost.server.errors import (
    APIError, AnthropicErrorBody, anthropic_body, documented_errors, from_selfhost_error,
)
from selfhost.server.serving import Generation, Serving, event_stream, unless_disconnected
from selfhost.tools.calls import ToolCall, check_tools
from selfhost.tools.model_tools import OutputSplitter

router = APIRouter(prefix="/v1", tags=["anthropic"], responses=documented_errors(AnthropicErrorBody))
log = logging.getLogger("selfhost.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _serving(request: Request) -> Serving:
    return request.app.state.serving


async def _tokenize(serving: Serving, served, req: CountTokensRequest | MessagesRequest) -> list[int]:
    tools, choice = req.tool_specs(), req.choice_of_tool()
    try:
        check_tools(tools, choice)
    except SelfhostError as err:
        raise from_selfhost_error(err) from err
    return await serving.tokenize_chat(served, req.message_dicts(), tools if req.uses_tools else [])


async def _prepare(serving: Serving, served, req: MessagesRequest) -> Generation:
    prompt_ids = await _tokenize(serving, served, req)
    constraint = None
    if req.uses_tools:
        parallel = not (req.tool_choice and req.tool_choice.disable_parallel_tool_use)
        constraint = served.tools.constraint(req.tool_specs(), req.choice_of_tool(), parallel)
    return await serving.prepare(served, [prompt_ids], req.max_tokens,
                                 lambda max_tokens, _: req.sampling_params(max_tokens, constraint),
                                 prompt_param="messages", constraint_param="tools")


@router.post("/messages", response_model=MessageResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def messages(req: MessagesRequest, request: Request):
    serving = _serving(request)
    served = await serving.model(req.model)
    gen = await _prepare(serving, served, req)
    if req.stream:
        return StreamingResponse(event_stream(request, _message_events(serving, req, gen), _error_event),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await unless_disconnected(request, _message(serving, req, gen))


@router.post("/messages/count_tokens", response_model=TokenCount)
async def count_tokens(req: CountTokensRequest, request: Request) -> TokenCount:
    serving = _serving(request)
    served = await serving.model(req.model)
    return TokenCount(input_tokens=len(await _tokenize(serving, served, req)))


# -- how a generation ended -------------------------------------------------------

def _matched_stop(tokenizer, text: str, token_ids: list[int], stops: list[str]) -> str | None:
    """The stop sequence that ended the output, if one did. The engine cuts the text where the first stop
    string starts, so the output's full decoding continues with that string right there."""
    full = tokenizer.decode(token_ids)
    return next((s for s in stops if full.startswith(s, len(text))), None)


def _stop_reason(finish: str | None, has_calls: bool, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    if has_calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def _tool_use(call: ToolCall) -> ToolUseBlock:
    return ToolUseBlock(id=tool_use_id(call.id), name=call.name, input=call.arguments_dict)


# -- whole responses ----------------------------------------------------------------

async def _message(serving: Serving, req: MessagesRequest, gen: Generation) -> MessageResponse:
    result = (await serving.collect(gen))[0]
    text, calls = result.text, []
    if req.uses_tools:
        parsed = gen.served.tools.parse(result.token_ids)
        text, calls = parsed.content, parsed.calls
    stop = None
    if result.finish_reason == "stop" and req.stop_sequences and not calls:
        stop = _matched_stop(gen.served.llm.tokenizer, result.text, result.token_ids, req.stop_sequences)
    content = ([TextBlock(text=text)] if text else []) + [_tool_use(c) for c in calls]
    return MessageResponse(id=message_id(), model=req.model, content=content,
                           stop_reason=_stop_reason(result.finish_reason, bool(calls), stop), stop_sequence=stop,
                           usage=AnthropicUsage(input_tokens=gen.num_prompt_tokens - gen.num_cached_tokens,
                                                output_tokens=len(result.token_ids),
                                                cache_read_input_tokens=gen.num_cached_tokens))


# -- streams ----------------------------------------------------------------------

def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def _error_event(err: Exception) -> str:
    if isinstance(err, SelfhostError):
        err = from_selfhost_error(err)
    elif not isinstance(err, APIError):
        log.exception("stream failed", exc_info=err)
        err = APIError(f"internal error: {type(err).__name__}", 500)
    body = anthropic_body(err)
    return f"event: error\ndata: {json.dumps(body)}\n\n"


class _Blocks:
    """Numbers the content blocks of a streamed message: text opens a block on its first piece; each tool call
    is one whole block (start, its arguments in one input_json_delta, stop)."""

    def __init__(self):
        self.index, self.text_open = 0, False

    def text(self, piece: str) -> list[str]:
        out = []
        if not self.text_open:
            out.append(_event("content_block_start", {"index": self.index,
                                                      "content_block": {"type": "text", "text": ""}}))
            self.text_open = True
        out.append(_event("content_block_delta", {"index": self.index,
                                                  "delta": {"type": "text_delta", "text": piece}}))
        return out

    def close_text(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        self.index += 1
        return [_event("content_block_stop", {"index": self.index - 1})]

    def tool_use(self, call: ToolCall) -> list[str]:
        out = self.close_text()
        block = {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": {}}
        out.append(_event("content_block_start", {"index": self.index, "content_block": block}))
        out.append(_event("content_block_delta", {"index": self.index,
                                                  "delta": {"type": "input_json_delta", "partial_json": call.arguments}}))
        out.append(_event("content_block_stop", {"index": self.index}))
        self.index += 1
        return out


async def _message_events(serving: Serving, req: MessagesRequest, gen: Generation) -> AsyncIterator[str]:
    served, blocks = gen.served, _Blocks()
    start = {"id": message_id(), "type": "message", "role": "assistant", "model": req.model, "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": gen.num_prompt_tokens, "output_tokens": 0}}
    yield _event("message_start", {"message": start})
    yield _event("ping", {})
    text, token_ids, calls, finish = "", [], [], None
    output = OutputSplitter(served.tools if req.uses_tools else None)
    async for _, delta in serving.run(gen):
        text += delta.text
        token_ids += delta.token_ids
        finish = delta.finish_reason
        piece, new_calls = output.feed(delta)
        calls = new_calls or calls
        if piece:
            for event in blocks.text(piece):
                yield event
    for event in blocks.close_text():
        yield event
    for call in calls:
        for event in blocks.tool_use(call):
            yield event
    stop = None
    if finish == "stop" and req.stop_sequences and not calls:
        stop = _matched_stop(served.llm.tokenizer, text, token_ids, req.stop_sequences)
    yield _event("message_delta", {"delta": {"stop_reason": _stop_reason(finish, bool(calls), stop),
                                             "stop_sequence": stop},
                                   # message_start goes out before the prompt is admitted; the split
                                   # between computed and cached prompt tokens is known here
                                   "usage": {"output_tokens": len(token_ids),
                                             "input_tokens": gen.num_prompt_tokens - gen.num_cached_tokens,
                                             "cache_read_input_tokens": gen.num_cached_tokens}})
    yield _event("message_stop", {})
