"""OpenAI Responses API: POST /v1/responses (whole or as typed server-sent events), GET and DELETE by id.

A request's conversation is the stored conversation of `previous_response_id` (its input
and output items) followed by its own input; `instructions` are not carried over, as
OpenAI documents. Tools and `text.format` become the same output constraints as in chat
completions. With `store` (the default) the response and its conversation are saved.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter

from selfhost.errors import SelfhostError
from selfhost.server.errors import APIError, OpenAIErrorBody, documented_errors, from_selfhost_error
from selfhost.server.responses_protocol import (
    InputItem, ResponseObject, ResponsesRequest, ResponseUsage, as_messages, function_call_item, item_id,
    message_item,
)
from selfhost.server.responses_store import ResponseStore
from selfhost.server.serving import Generation, Serving, event_stream, unless_disconnected
from selfhost.tools.calls import ToolCall, check_tools
from selfhost.tools.model_tools import OutputSplitter

router = APIRouter(prefix="/v1", tags=["openai"], responses=documented_errors(OpenAIErrorBody))
log = logging.getLogger("selfhost.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ITEMS = TypeAdapter(list[InputItem])


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


async def _conversation(store: ResponseStore, req: ResponsesRequest) -> list[dict[str, Any]]:
    """Every input item of this request's chain, as dicts (what is stored)."""
    earlier: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        stored = await asyncio.to_thread(store.get, req.previous_response_id)
        if stored is None:
            raise APIError(f"previous_response_id={req.previous_response_id!r} is not a stored response (it was "
                           "sent with store=false, has expired, or never existed)", 404,
                           param="previous_response_id", code="previous_response_not_found")
        earlier = stored.conversation + stored.response["output"]
    return earlier + [item.model_dump(by_alias=True, exclude_none=True) for item in req.input_items()]


async def _prepare(serving: Serving, served, req: ResponsesRequest, conversation: list[dict]) -> Generation:
    tools, choice = req.tool_specs(), req.choice_of_tool()
    try:
        check_tools(tools, choice)
    except SelfhostError as err:
        raise from_selfhost_error(err) from err
    messages = as_messages(_ITEMS.validate_python(conversation))
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    prompt_ids = await serving.tokenize_chat(served, messages, tools if req.uses_tools else [])
    constraint, constraint_param = req.text_constraint(), "text.format"
    if req.uses_tools:
        constraint, constraint_param = served.tools.constraint(tools, choice, req.parallel_tool_calls), "tools"
    return await serving.prepare(served, [prompt_ids], req.max_output_tokens,
                                 lambda max_tokens, _: req.sampling_params(max_tokens, constraint),
                                 max_tokens_param="max_output_tokens", prompt_param="input",
                                 constraint_param=constraint_param)


@router.post("/responses", response_model=ResponseObject, responses={200: {"content": {"text/event-stream": {}}}})
async def create_response(req: ResponsesRequest, request: Request):
    serving, store = request.app.state.serving, _store(request)
    served = await serving.model(req.model)
    conversation = await _conversation(store, req)
    gen = await _prepare(serving, served, req, conversation)
    if req.stream:
        events = _ResponseEvents(serving, store, req, gen, conversation)
        return StreamingResponse(event_stream(request, events.stream(), events.error),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await unless_disconnected(request, _response(serving, store, req, gen, conversation))


@router.get("/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, request: Request) -> dict:
    stored = await asyncio.to_thread(_store(request).get, response_id)
    if stored is None:
        raise APIError(f"no stored response with id {response_id!r}", 404, param="response_id",
                       code="response_not_found")
    return stored.response


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    if not await asyncio.to_thread(_store(request).delete, response_id):
        raise APIError(f"no stored response with id {response_id!r}", 404, param="response_id",
                       code="response_not_found")
    return {"id": response_id, "object": "response", "deleted": True}


# -- building the response ----------------------------------------------------------

def _skeleton(req: ResponsesRequest, response_id: str, status: str) -> ResponseObject:
    """The response before its output: the request's settings echoed, as OpenAI does."""
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    return ResponseObject(
        id=response_id, status=status, model=req.model, instructions=req.instructions,
        previous_response_id=req.previous_response_id, store=req.store, temperature=req.temperature,
        top_p=req.top_p, max_output_tokens=req.max_output_tokens, parallel_tool_calls=req.parallel_tool_calls,
        tool_choice=choice or ("auto" if req.tools else "none"),
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}},
        metadata=req.metadata or {},
    )


def _finished(response: ResponseObject, finish: str | None, prompt_tokens: int, output_tokens: int) -> None:
    response.status = "incomplete" if finish == "length" else "completed"
    response.incomplete_details = {"reason": "max_output_tokens"} if finish == "length" else None
    response.usage = ResponseUsage(input_tokens=prompt_tokens, output_tokens=output_tokens,
                                   total_tokens=prompt_tokens + output_tokens)


async def _save(store: ResponseStore, req: ResponsesRequest, response: ResponseObject, conversation: list) -> None:
    if req.store:
        await asyncio.to_thread(store.save, response.model_dump(), conversation)


async def _response(serving: Serving, store: ResponseStore, req: ResponsesRequest, gen: Generation,
                    conversation: list) -> dict:
    result = (await serving.collect(gen))[0]
    text, calls = result.text, []
    if req.uses_tools:
        parsed = gen.served.tools.parse(result.token_ids)
        text, calls = parsed.content, parsed.calls
    response = _skeleton(req, item_id("resp"), "in_progress")
    response.output = ([message_item(text)] if text or not calls else []) + [function_call_item(c) for c in calls]
    _finished(response, result.finish_reason, gen.num_prompt_tokens, len(result.token_ids))
    await _save(store, req, response, conversation)
    return response.model_dump()


# -- streams ------------------------------------------------------------------------

class _ResponseEvents:
    """One streamed response: every event numbered, text as one message item, then one item per call."""

    def __init__(self, serving: Serving, store: ResponseStore, req: ResponsesRequest, gen: Generation,
                 conversation: list):
        self.serving, self.store, self.req, self.gen, self.conversation = serving, store, req, gen, conversation
        self.response = _skeleton(req, item_id("resp"), "in_progress")
        self.sequence_number = 0
        self.message_id: str | None = None
        self.text = ""

    def event(self, kind: str, **data) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **data}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def error(self, err: Exception) -> str:
        if isinstance(err, SelfhostError):
            err = from_selfhost_error(err)
        elif not isinstance(err, APIError):
            log.exception("stream failed", exc_info=err)
            err = APIError(f"internal error: {type(err).__name__}", 500, code="internal_error")
        return self.event("error", code=err.code, message=err.message, param=err.param)

    def _text(self, piece: str) -> list[str]:
        out = []
        if self.message_id is None:
            self.message_id = item_id("msg")
            out.append(self.event("response.output_item.added", output_index=0,
                                  item=message_item("", "in_progress", self.message_id)))
            out.append(self.event("response.content_part.added", item_id=self.message_id, output_index=0,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        if piece:
            self.text += piece
            out.append(self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                  content_index=0, delta=piece, logprobs=[]))
        return out

    def _close_text(self) -> list[str]:
        item = message_item(self.text, id_=self.message_id)
        self.response.output.append(item)
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return [self.event("response.output_text.done", text=self.text, logprobs=[], **where),
                self.event("response.content_part.done", part=item["content"][0], **where),
                self.event("response.output_item.done", output_index=0, item=item)]

    def _call(self, call: ToolCall) -> list[str]:
        index, fc_id = len(self.response.output), item_id("fc")
        item = function_call_item(call, id_=fc_id)
        self.response.output.append(item)
        return [self.event("response.output_item.added", output_index=index,
                           item=function_call_item(call, "in_progress", fc_id)),
                self.event("response.function_call_arguments.delta", item_id=fc_id, output_index=index,
                           delta=call.arguments),
                self.event("response.function_call_arguments.done", item_id=fc_id, output_index=index,
                           name=call.name, arguments=call.arguments),
                self.event("response.output_item.done", output_index=index, item=item)]

    async def stream(self) -> AsyncIterator[str]:
        served, req = self.gen.served, self.req
        yield self.event("response.created", response=self.response.model_dump())
        yield self.event("response.in_progress", response=self.response.model_dump())
        token_ids, calls, finish = [], [], None
        output = OutputSplitter(served.tools if req.uses_tools else None)
        async for _, delta in self.serving.run(self.gen):
            token_ids += delta.token_ids
            finish = delta.finish_reason
            piece, new_calls = output.feed(delta)
            calls = new_calls or calls
            for event in self._text(piece) if piece else ():
                yield event
        if self.message_id is None and not calls:  # an empty answer is still one (empty) message
            for event in self._text(""):
                yield event
        for event in self._close_text() if self.message_id is not None else ():
            yield event
        for call in calls:
            for event in self._call(call):
                yield event
        _finished(self.response, finish, self.gen.num_prompt_tokens, len(token_ids))
        await _save(self.store, req, self.response, self.conversation)
        kind = "response.completed" if self.response.status == "completed" else "response.incomplete"
        yield self.event(kind, response=self.response.model_dump())
