"""The generation logic both APIs share: prompt -> validated jobs -> merged deltas -> metrics.

Routes turn a wire request into a `Generation` with `prepare()` (tokenize off
the event loop, build one SamplingParams per choice, and run the engine's own
request check so a bad request is a 400 before any stream starts),
then consume `run()` (one `(choice_index, StreamDelta)` per engine step and
choice) either as a stream or through `collect()`. Streams go out through
`event_stream()`, which checks for a vanished client before every chunk and
ends a failed stream with an error event instead of a cut connection. Whole
responses go through `unless_disconnected()`, which aborts the generation as
soon as the client hangs up rather than when it would have finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from selfhost.errors import SelfhostError
from selfhost.outputs import StreamDelta, TokenLogprob
from selfhost.sampling_params import SamplingParams
from selfhost.server.errors import APIError, from_selfhost_error
from selfhost.server.guards import API_KEY_DIGEST
from selfhost.server.metrics import ServerMetrics
from selfhost.server.models import ServedModel
from selfhost.tools.calls import ToolSpec

log = logging.getLogger("selfhost.server")

# One request may not flood the batch: prompts x n is bounded.
MAX_CHOICES_PER_REQUEST = 256

# Builds the params of choice `i` given the resolved max_tokens.
ParamsFactory = Callable[[int, int], SamplingParams]


@dataclass
class Generation:
    served: ServedModel
    prompts: list[list[int]]  # token ids per prompt
    jobs: list[tuple[list[int], SamplingParams]]  # one per choice: prompt i * n + j
    request_id: str
    cache_salt: bytes | None = None  # prefix-cache scope (LLMEngine.add_request)
    started: float = field(default_factory=time.perf_counter)
    cached_by_job: dict[int, int] = field(default_factory=dict)  # job -> prompt tokens the prefix cache held

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens read from the prefix cache, each prompt counted once (as its first choice found it)."""
        per_prompt = len(self.jobs) // max(1, len(self.prompts))
        return sum(self.cached_by_job.get(i * per_prompt, 0) for i in range(len(self.prompts)))


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def resolve_max_tokens(requested: int | None, prompt_len: int, served: ServedModel, param: str) -> int:
    """OpenAI semantics: no limit means 'as many as fit'; an explicit one must fit in the context window
    (the engine would quietly stop at the window instead). The prompt itself is the engine's to check."""
    limits = served.llm.engine.limits
    if requested is None:
        return max(limits.room_for_output(prompt_len), 1)  # a prompt that leaves no room fails the engine's check
    window = limits.max_model_len
    if prompt_len < window < prompt_len + requested:
        raise APIError(f"{param}={requested} plus the prompt's {prompt_len} tokens exceeds model {served.name!r}'s "
                       f"context window of {window} tokens (at most {window - prompt_len})",
                       param=param, code="context_length_exceeded")
    return requested


def _check_chars(served: ServedModel, chars: int, param: str) -> None:
    """Refuse text that cannot fit the context window before spending CPU on tokenizing it."""
    limit = served.llm.max_model_len * served.llm.tokenizer.longest_token_chars
    if chars > limit:
        raise APIError(f"{param} has {chars} characters: more than model {served.name!r}'s context window of "
                       f"{served.llm.max_model_len} tokens can hold (at most {limit} characters for this tokenizer)",
                       param=param, code="context_length_exceeded")


class Serving:
    def __init__(self, models, metrics: ServerMetrics, max_n: int, prefix_cache_scope: str = "global"):
        self.models = models
        self.metrics = metrics
        self.max_n = max_n
        self.prefix_cache_scope = prefix_cache_scope

    async def model(self, name: str) -> ServedModel:
        served = await self.models.get(name)
        served.last_used = time.monotonic()  # keep-alive counts from the request's arrival
        return served

    async def tokenize_chat(self, served: ServedModel, messages: list[dict], tools: list[ToolSpec] = ()) -> list[int]:
        """Render and tokenize a conversation; with tools, or tool calls and results in it, in the model's
        tool-call format (selfhost.tools)."""
        tokenizer = served.llm.tokenizer
        if not tokenizer.has_chat_template:
            raise APIError(f"model {served.name!r} has no chat template; use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        _check_chars(served, sum(len(m.get("content") or "") for m in messages), "messages")
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            return await asyncio.to_thread(served.tools.encode_chat, messages, list(tools))
        return await asyncio.to_thread(tokenizer.encode_chat, messages)

    async def tokenize(self, served: ServedModel, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            _check_chars(served, len(prompt), "prompt")
            return await asyncio.to_thread(served.llm.tokenizer.encode, prompt)
        return list(prompt)  # ids outside the vocabulary are the engine's check, in prepare()

    async def prepare(
        self, served: ServedModel, prompts: list[list[int]], requested_max_tokens: int | None,
        make_params: ParamsFactory, n: int = 1, max_tokens_param: str = "max_tokens",
        prompt_param: str = "prompt", constraint_param: str = "response_format",
    ) -> Generation:
        if n > self.max_n:
            raise APIError(f"n={n} is more than this server allows ({self.max_n}); see --max-n", param="n")
        if len(prompts) * n > MAX_CHOICES_PER_REQUEST:
            raise APIError(f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; at most "
                           f"{MAX_CHOICES_PER_REQUEST} per request", param="prompt")
        # The engine's names for the request fields an error may point at -> this request's names.
        fields = {"prompt": prompt_param, "max_tokens": max_tokens_param, "structured_output": constraint_param}
        jobs = []
        for prompt_ids in prompts:
            max_tokens = resolve_max_tokens(requested_max_tokens, len(prompt_ids), served, max_tokens_param)
            try:
                choices = [make_params(max_tokens, choice) for choice in range(n)]
                # The choices differ only in their seed; the engine checks each again when it is added.
                # An output constraint compiles here (milliseconds, cached), so off the event loop.
                if choices[0].structured_output is not None:
                    await asyncio.to_thread(served.llm.engine.validate_request, prompt_ids, choices[0])
                else:
                    served.llm.engine.validate_request(prompt_ids, choices[0])
            except SelfhostError as err:
                raise from_selfhost_error(err, fields) from err
            jobs.extend((prompt_ids, params) for params in choices)
        # "key": a request reuses cached prefixes only of requests made with the same API key.
        salt = API_KEY_DIGEST.get() if self.prefix_cache_scope == "key" else None
        return Generation(served, prompts, jobs, uuid.uuid4().hex[:16], salt)

    async def run(self, gen: Generation) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Every choice's deltas as they come; aborts all of them if the consumer stops early."""
        served = gen.served
        served.begin()
        first_token: float | None = None
        num_output = [0] * len(gen.jobs)
        try:
            async with aclosing(self._merged(served.engine, gen)) as deltas:
                async for index, delta in deltas:
                    if first_token is None:
                        first_token = time.perf_counter()
                    new = delta.num_output_tokens - num_output[index]
                    num_output[index] = delta.num_output_tokens
                    gen.cached_by_job[index] = delta.num_cached_tokens
                    self.metrics.observe_tokens(new)
                    yield index, delta
        finally:
            served.end()
            self.metrics.observe_request(served.name, gen.num_prompt_tokens, sum(num_output),
                                         gen.started, first_token, time.perf_counter())

    @staticmethod
    async def _merged(engine, gen: Generation) -> AsyncIterator[tuple[int, StreamDelta]]:
        if len(gen.jobs) == 1:  # the common case, without a task per choice
            prompt_ids, params = gen.jobs[0]
            async with aclosing(engine.generate(prompt_ids, params, gen.request_id, gen.cache_salt,
                                                gen.served.lora)) as deltas:
                async for delta in deltas:
                    yield 0, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt_ids: list[int], params: SamplingParams) -> None:
            try:
                async with aclosing(engine.generate(prompt_ids, params, f"{gen.request_id}-{index}",
                                                    gen.cache_salt, gen.served.lora)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((index, delta))
            except Exception as err:  # handed to the consumer, which raises it
                queue.put_nowait((index, err))

        tasks = [asyncio.create_task(pump(i, p, sp)) for i, (p, sp) in enumerate(gen.jobs)]
        unfinished = len(tasks)
        try:
            while unfinished:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.is_finished:
                    unfinished -= 1
                yield index, item
        finally:
            for task in tasks:  # cancelling a pump closes its generator, which aborts the request
                task.cancel()

    async def collect(self, gen: Generation) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in gen.jobs]
        async with aclosing(self.run(gen)) as deltas:
            async for index, delta in deltas:
                r = results[index]
                r.text += delta.text
                r.token_ids += delta.token_ids
                r.logprobs += delta.logprobs or []
                r.finish_reason = delta.finish_reason
                if delta.prompt_logprobs is not None:
                    r.prompt_logprobs = delta.prompt_logprobs
        return results


def error_body(err: Exception) -> dict:
    if isinstance(err, APIError):
        return err.body()
    if isinstance(err, SelfhostError):
        return from_selfhost_error(err).body()
    log.exception("stream failed", exc_info=err)
    return APIError(f"internal error: {type(err).__name__}", 500, code="internal_error").body()


async def event_stream(request: Request, events: AsyncIterator[str], on_error: Callable[[Exception], str]):
    """Bytes for a StreamingResponse: stop (and abort) when the client leaves; end a failure cleanly."""
    try:
        async with aclosing(events) as items:
            async for item in items:
                if await request.is_disconnected():
                    log.info("client went away; aborting its request")
                    return
                yield item
    except asyncio.CancelledError:
        raise
    except Exception as err:
        yield on_error(err)


T = TypeVar("T")

# nginx's "client closed request": what the access log records for an abandoned response.
CLIENT_CLOSED_REQUEST = 499


async def _disconnect(request: Request) -> None:
    # Once the body is read, the server's next ASGI message for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await a whole (non-streamed) response; if the client hangs up first, cancel the work.

    Cancelling closes the generation's delta streams, which aborts its engine
    requests and frees their KV blocks at the next step boundary.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.create_task(_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        log.info("client went away before its response; aborting its request")
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        raise APIError("the client closed the connection before the response was ready", CLIENT_CLOSED_REQUEST,
                       code="client_disconnected")
    finally:
        work_task.cancel()
        watch_task.cancel()


# Characters a JSON encoder leaves raw but some line splitters end a line at (Python's str.splitlines,
# which httpx's iter_lines follows): escaped, so a generated NEL or line separator cannot cut an event.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: str) -> str:
    """One server-sent event holding `data` (JSON, or [DONE])."""
    return f"data: {data.translate(_LINE_BREAKS_JSON_KEEPS)}\n\n"


def sse_error(err: Exception) -> str:
    return sse(json.dumps(error_body(err))) + sse("[DONE]")
