"""The same workload through the in-process engine, to show what the server adds.

`EngineClient.send` has the shape of `EndpointClient.send` (a BenchRequest in,
a RequestRecord out), so the runner drives it with the same levels, closed-loop
concurrency or Poisson arrivals, and the statistics come out the same way. It
talks to `selfhost.AsyncEngine`, the engine `selfhost serve` wraps, built with
the server's defaults: what differs from an HTTP run of the same flags is HTTP,
JSON and SSE, request validation and the client's own parsing.

Timing follows the HTTP client's rules: TTFT is the first delta that carries
text, ITL the gaps between such deltas (one per engine step, as the server
sends one chunk per step), E2E ends at the delta that finishes the request.
Chat requests go through the model's chat template like /v1/chat/completions;
`api="completions"` sends `BenchRequest.prompt_text()` like /v1/completions.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing
from typing import Any

from selfhost.bench.record import RequestRecord
from selfhost.bench.workload import BenchRequest
from selfhost.errors import SelfhostError


class OfflineUnavailableError(SelfhostError):
    """Offline mode asked for, but this install has no in-process engine API."""


def load_engine(model: str) -> Any:
    """An AsyncEngine over `LLM(model)`, sized like `selfhost serve`'s default. Call `shutdown()` when done."""
    try:
        from selfhost import LLM, AsyncEngine
    except ImportError:
        raise OfflineUnavailableError(
            "--offline needs the in-process engine (`from selfhost import LLM, AsyncEngine`), which this install lacks"
        ) from None
    return AsyncEngine(LLM(model))


class EngineClient:
    """Sends bench requests to an AsyncEngine in this process."""

    def __init__(
        self, engine: Any, api: str = "chat", temperature: float = 0.0, ignore_eos: bool = True,
        timeout_s: float = 300.0,
    ) -> None:
        from selfhost import SamplingParams

        self.engine = engine
        self.api = api
        self.timeout_s = timeout_s
        self._params = lambda max_tokens: SamplingParams(
            max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos
        )
        self._ids = itertools.count()

    def prompt_ids(self, request: BenchRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if self.api == "chat":
            return tokenizer.encode_chat(request.chat_messages())
        return tokenizer.encode(request.prompt_text())

    async def send(self, request: BenchRequest, zero_s: float) -> RequestRecord:
        """Generate one reply; `zero_s` is the level's start on time.perf_counter()."""
        start_s = time.perf_counter()
        text_times: list[float] = []
        prompt_tokens: int | None = None
        output_tokens = 0
        error: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                params = self._params(request.max_tokens)
                deltas = self.engine.generate(self.prompt_ids(request), params, f"bench-{next(self._ids)}")
                async with aclosing(deltas):  # closing aborts the request if we stop early
                    async for delta in deltas:
                        if delta.text:
                            text_times.append(time.perf_counter())
                        prompt_tokens, output_tokens = delta.num_prompt_tokens, delta.num_output_tokens
        except TimeoutError:
            error = ("timeout", f"no complete reply within {self.timeout_s:g} s")
        except SelfhostError as err:  # what a server would answer with a 400, e.g. a prompt over the context
            error = ("engine", str(err))
        except Exception as err:  # AsyncEngine hands a failed step's exception to every request in the batch
            error = ("engine", repr(err))
        end_s = time.perf_counter()
        return RequestRecord(
            index=request.index,
            start_s=start_s - zero_s,
            end_s=end_s - zero_s,
            error=error[0] if error else None,
            error_detail=error[1] if error else None,
            ttft_s=text_times[0] - start_s if text_times else None,
            itl_s=tuple(b - a for a, b in zip(text_times, text_times[1:])),
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens if error is None else 0,
            tokens_source="engine",
        )
