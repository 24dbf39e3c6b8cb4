"""AsyncEngine: the batching engine behind an asyncio API.

One worker thread owns the LLMEngine and loops over `step()`; asyncio callers
talk to it through a command queue (add / abort) and receive per-step deltas on
their own asyncio.Queue. Model work never runs on the event loop, and a
cancelled consumer (a client that went away) aborts its request, which frees
its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from selfhost.engine.sequence import Sequence
from selfhost.outputs import StreamDelta
from selfhost.sampling_params import SamplingParams

log = logging.getLogger("selfhost.engine")
# How long the worker waits before trying again when requests are queued but none can run
# (every adapter slot is held): short, since the slot frees at a step boundary.
IDLE_POLL_S = 0.002


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    seq: Sequence | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    request: _Request
    cache_salt: bytes | None = None
    lora: str | None = None  # adapter name (LLM(lora=...)); None: the base model
    accepted: Future = field(default_factory=Future)


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Wraps an `LLM`; use it instead of (not alongside) that LLM's own generate methods."""

    def __init__(self, llm):
        self.llm = llm
        llm.driven_by_async_engine = True
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._requests: dict[str, _Request] = {}
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="selfhost-engine", daemon=True)
        self._worker.start()

    # -- asyncio side ----------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, cache_salt: bytes | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield one StreamDelta per step that produced tokens, the last with a finish_reason.

        `cache_salt`: prefix-cache scope; `lora`: the adapter to generate with (LLMEngine.add_request)."""
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = _Request(asyncio.get_running_loop(), asyncio.Queue())
        command = _Add(request_id, prompt_ids, params, request, cache_salt, lora)
        self._commands.put(command)
        try:
            await asyncio.wrap_future(command.accepted)  # raises the engine's validation error, if any
        except asyncio.CancelledError:
            # The caller left while the request was being queued: if the engine took it, take it back
            # (the abort queues behind the add, so it always finds it).
            self.abort(request_id)
            raise
        finished = False
        try:
            while True:
                delta = await request.outputs.get()
                if isinstance(delta, BaseException):
                    raise delta
                yield delta
                if delta.is_finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (safe to call from any thread)."""
        self._commands.put(_Abort(request_id))

    def stats(self):
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(None)
        self._worker.join(timeout=10)

    # -- worker thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            # Block only when idle; otherwise drain what arrived during the last step.
            self._handle(self._commands.get() if not self.engine.has_work else None)
            while not self._commands.empty():
                self._handle(self._commands.get_nowait())
            if self._stopped or not self.engine.has_work:
                continue
            try:
                updated = self.engine.step()
            except Exception as err:  # a bug must not take the server down: fail the batch, keep serving
                log.exception("engine step failed; failing the running requests")
                for request_id in list(self._requests):
                    self._fail(request_id, err)
                continue
            for seq in updated:
                self._deliver(seq)
            if not updated and self.engine.last_step_was_empty:
                # Requests wait but none can run yet: wait for news (an abort, a new request) or a moment.
                try:
                    self._handle(self._commands.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    pass

    def _handle(self, command) -> None:
        if isinstance(command, _Add):
            if not command.accepted.set_running_or_notify_cancel():
                return  # its caller stopped waiting before the engine got to it: nothing to add
            try:
                command.request.seq = self.engine.add_request(command.request_id, command.prompt_ids, command.params,
                                                              command.cache_salt, command.lora)
            except Exception as err:  # validation errors go back to the caller
                command.accepted.set_exception(err)
                return
            self._requests[command.request_id] = command.request
            command.accepted.set_result(None)
        elif isinstance(command, _Abort):
            self._requests.pop(command.request_id, None)
            self.engine.abort(command.request_id)

    def _deliver(self, seq: Sequence) -> None:
        request = self._requests.get(seq.request_id)
        if request is None:
            return
        new_tokens = seq.output_ids[request.sent_tokens :]
        new_logprobs = None
        if seq.logprobs is not None:
            new_logprobs = seq.logprobs[request.sent_logprobs :]
            request.sent_logprobs = len(seq.logprobs)
        # The prompt is fully scored by the step that yields the first token.
        is_first = request.sent_tokens == 0
        prompt_logprobs = list(seq.prompt_logprobs) if is_first and seq.prompt_logprobs is not None else None
        request.sent_tokens = len(seq.output_ids)
        delta = StreamDelta(
            request_id=seq.request_id,
            text=seq.take_delta(),
            token_ids=new_tokens,
            logprobs=new_logprobs,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=seq.num_cached_prompt_tokens,
        )
        if seq.is_finished:
            self._requests.pop(seq.request_id, None)
        self._send(seq.request_id, request, delta)

    def _send(self, request_id: str, request: _Request, item) -> None:
        try:
            request.loop.call_soon_threadsafe(request.outputs.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
            self._requests.pop(request_id, None)
            self.engine.abort(request_id)

    def _fail(self, request_id: str, err: Exception) -> None:
        request = self._requests.pop(request_id)
        self.engine.abort(request_id)
        self._send(request_id, request, err)
