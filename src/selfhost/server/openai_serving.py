"""OpenAI response shapes for chat and completions, whole or as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from selfhost.outputs import TokenLogprob
from selfhost.errors import SelfhostError
from selfhost.server.errors import from_selfhost_error
from selfhost.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, TokenLogprobEntry, TopLogprob, UsageInfo,
)
from selfhost.server.serving import Generation, Serving, sse
from selfhost.server.tool_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCallItem
from selfhost.server.wire import random_id
from selfhost.tools.calls import check_tools
from selfhost.tools.model_tools import OutputSplitter


def _usage(gen: Generation, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=gen.num_prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=gen.num_prompt_tokens + completion_tokens,
                     prompt_tokens_details={"cached_tokens": gen.num_cached_tokens})


def _finish(reason: str | None) -> str | None:
    return None if reason is None else "stop" if reason == "abort" else reason


# -- logprobs -------------------------------------------------------------------

def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for e in entries:
        head = top(e.token_id, e.logprob)
        alts = [top(t, lp) for t, lp in e.top.items()]
        content.append(TokenLogprobEntry(**head.model_dump(), top_logprobs=alts))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int, echo_ids: list[int] = (),
                        echo_logprobs: list[TokenLogprob | None] | None = None) -> CompletionLogprobs:
    """Echoed prompt tokens (scored given their prefix; the first has none), then generated ones.

    `text_offset` indexes the choice's text: echoed tokens count from 0, generated
    ones from `offset` (where they start in that text); special tokens the text
    leaves out, such as BOS, take no room.
    """
    special = set(tokenizer.hf.all_special_ids)
    out = CompletionLogprobs()

    def add(pairs, at: int) -> None:
        for token_id, e in pairs:
            text = tokenizer.token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(None if e is None else e.logprob)
            out.top_logprobs.append(None if e is None else {tokenizer.token_text(t): lp for t, lp in e.top.items()})
            out.text_offset.append(at)
            at += 0 if token_id in special else len(text)

    add(zip(echo_ids, echo_logprobs if echo_logprobs is not None else [None] * len(echo_ids)), 0)
    add(((e.token_id, e) for e in entries), offset)
    return out


# -- chat -------------------------------------------------------------------------

async def prepare_chat(serving: Serving, served, req: ChatCompletionRequest, messages: list[dict]) -> Generation:
    """Tokenize `messages` (the request's own, or rewritten ones) and build the request's jobs.

    With tools in use the output constraint is the model's tool-call grammar (a `required` or
    named call is always a valid call); otherwise `response_format`'s, if any.
    """
    tools, choice = req.tool_specs(), req.choice_of_tool()
    try:
        check_tools(tools, choice)
    except SelfhostError as err:
        raise from_selfhost_error(err) from err
    # The tools stay in the prompt under tool_choice="none" too: the model still knows them, as with OpenAI.
    prompt_ids = await serving.tokenize_chat(served, messages, tools)
    constraint, constraint_param = None, "response_format"
    if req.uses_tools:
        constraint, constraint_param = served.tools.constraint(tools, choice, req.parallel_tool_calls), "tools"
    elif req.response_format is not None:
        constraint = req.response_format.structured_output()
    return await serving.prepare(
        served, [prompt_ids], req.requested_max_tokens,
        lambda max_tokens, i: req.sampling_params(max_tokens, req.num_logprobs, i, structured_output=constraint),
        n=req.n, max_tokens_param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
        prompt_param="messages", constraint_param=constraint_param,
    )


def _finish_with_tools(reason: str | None, calls) -> str | None:
    return "tool_calls" if calls and reason == "stop" else _finish(reason)


async def chat_completion(serving: Serving, req: ChatCompletionRequest, gen: Generation) -> ChatCompletionResponse:
    results = await serving.collect(gen)
    tokenizer = gen.served.llm.tokenizer
    choices = []
    for i, r in enumerate(results):
        message, finish = AssistantMessage(content=r.text), _finish(r.finish_reason)
        if req.uses_tools:
            parsed = gen.served.tools.parse(r.token_ids)
            if parsed.calls:
                message = AssistantMessage(content=parsed.content or None, tool_calls=[
                    ToolCallItem(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in parsed.calls])
                finish = _finish_with_tools(r.finish_reason, parsed.calls)
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                  logprobs=chat_logprobs(tokenizer, r.logprobs) if req.logprobs else None))
    usage = _usage(gen, sum(len(r.token_ids) for r in results))
    return ChatCompletionResponse(id=random_id("chatcmpl"), model=req.model, choices=choices, usage=usage)


async def chat_completion_stream(serving: Serving, req: ChatCompletionRequest, gen: Generation) -> AsyncIterator[str]:
    chunk_id, created, tokenizer = random_id("chatcmpl"), int(time.time()), gen.served.llm.tokenizer

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=chunk_id, created=created, model=req.model, choices=choices,
                                       usage=usage).model_dump_json())

    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(len(gen.jobs))])
    completion_tokens = [0] * len(gen.jobs)
    tool_streams = [_ToolStream(gen.served.tools) for _ in gen.jobs] if req.uses_tools else None
    async for index, delta in serving.run(gen):
        completion_tokens[index] = delta.num_output_tokens
        if tool_streams is not None:
            for choice in tool_streams[index].choices(index, delta):
                yield chunk([choice])
            continue
        if not delta.text and not delta.is_finished and not (req.logprobs and delta.logprobs):
            continue  # a token still inside a stop-string check or a partial character
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=delta.text),
                                 finish_reason=_finish(delta.finish_reason))
        if req.logprobs and delta.logprobs:
            choice.logprobs = chat_logprobs(tokenizer, delta.logprobs)
        yield chunk([choice])
    if req.include_usage:
        yield chunk([], _usage(gen, sum(completion_tokens)))
    yield sse("[DONE]")


class _ToolStream:
    """One choice's chunks when tools are in use, as OpenAI streams them: text as soon as it cannot be
    part of a call; each call's id and name as soon as the name is written, then its arguments
    fragment by fragment as the model writes them; then the finish reason. The whole response
    carries the same argument text (the model's own), so the fragments reassemble to it."""

    def __init__(self, tools):
        self.output = OutputSplitter(tools)
        self.sent: dict[int, str] = {}  # call index -> argument text sent so far (its header went out)

    def choices(self, index: int, delta) -> list[ChatChunkChoice]:
        text, calls = self.output.feed(delta)
        out = [ChatChunkChoice(index=index, delta=DeltaMessage(content=text))] if text else []
        parts = []
        for i, (call_id, call) in enumerate(self.output.partial_calls()):
            if call.name is None:
                continue
            # Up to the first undecoded byte (a partial character decodes as U+FFFD for now).
            written = (call.arguments or "").split("\ufffd")[0] if (call.arguments or "").startswith("{") else ""
            parts += self._call_parts(i, call_id, call.name, written)
        for i, call in enumerate(calls):  # the end: what the fragments have not said yet
            parts += self._call_parts(i, call.id, call.name, call.arguments)
        if parts:
            out.append(ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=parts)))
        if delta.is_finished:
            out.append(ChatChunkChoice(index=index, delta=DeltaMessage(),
                                       finish_reason=_finish_with_tools(delta.finish_reason, calls)))
        return out

    def _call_parts(self, i: int, call_id: str, name: str, arguments: str) -> list[DeltaToolCall]:
        if i not in self.sent:
            self.sent[i] = ""
            header = DeltaToolCall(index=i, id=call_id, type="function", function=DeltaFunctionCall(name=name,
                                                                                                     arguments=""))
            return [header] + self._call_parts(i, call_id, name, arguments)
        sent = self.sent[i]
        if not arguments.startswith(sent) or len(arguments) == len(sent):
            return []
        self.sent[i] = arguments
        return [DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=arguments[len(sent):]))]


# -- completions ------------------------------------------------------------------

def _echo_text(req: CompletionRequest, gen: Generation, job: int, tokenizer) -> str:
    n_per_prompt = len(gen.jobs) // len(gen.prompts)
    prompt = req.prompts()[job // n_per_prompt]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


async def completion(serving: Serving, req: CompletionRequest, gen: Generation) -> CompletionResponse:
    results = await serving.collect(gen)
    tokenizer = gen.served.llm.tokenizer
    choices = []
    for i, r in enumerate(results):
        prefix = _echo_text(req, gen, i, tokenizer) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            echo_ids = gen.jobs[i][0] if req.echo else []
            logprobs = completion_logprobs(tokenizer, r.logprobs, len(prefix), echo_ids, r.prompt_logprobs)
        choices.append(CompletionChoice(index=i, text=prefix + r.text, logprobs=logprobs,
                                        finish_reason=_finish(r.finish_reason)))
    usage = _usage(gen, sum(len(r.token_ids) for r in results))
    return CompletionResponse(id=random_id("cmpl"), model=req.model, choices=choices, usage=usage)


async def completion_stream(serving: Serving, req: CompletionRequest, gen: Generation) -> AsyncIterator[str]:
    chunk_id, created, tokenizer = random_id("cmpl"), int(time.time()), gen.served.llm.tokenizer

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(CompletionResponse(id=chunk_id, created=created, model=req.model, choices=choices,
                                      usage=usage).model_dump_json())

    offsets = [0] * len(gen.jobs)
    to_echo = set(range(len(gen.jobs))) if req.echo else set()
    completion_tokens = [0] * len(gen.jobs)
    async for index, delta in serving.run(gen):
        if index in to_echo:  # with the first delta, which carries the prompt's logprobs
            to_echo.discard(index)
            text = _echo_text(req, gen, index, tokenizer)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, [], 0, gen.jobs[index][0], delta.prompt_logprobs)
            offsets[index] = len(text)
            yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs)])
        completion_tokens[index] = delta.num_output_tokens
        if not delta.text and not delta.is_finished and not (req.logprobs is not None and delta.logprobs):
            continue
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(tokenizer, delta.logprobs or [], offsets[index])
        offsets[index] += len(delta.text)
        yield chunk([CompletionChoice(index=index, text=delta.text, logprobs=logprobs,
                                      finish_reason=_finish(delta.finish_reason))])
    if req.include_usage:
        yield chunk([], _usage(gen, sum(completion_tokens)))
    yield sse("[DONE]")
