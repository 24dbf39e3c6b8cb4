"""The same workload through the in-process engine, to show what the server adds.

Uses only the public API (`from selfhost import LLM, SamplingParams`), imported
when offline mode is asked for. A level of concurrency c sends the workload in
batches of c prompts to `LLM.generate`, so up to c sequences decode together.

`generate` blocks until the whole batch is done and reports no per-token times,
so an offline record has an end-to-end latency (the batch's wall time) and
exact token counts, but no TTFT, TPOT or inter-token gaps; throughput is exact.
With api "chat" conversations go through `LLM.chat` (the model's chat template,
as a server's /v1/chat/completions would); with "completions" the plain
`BenchRequest.prompt_text` goes through `LLM.generate`. One SamplingParams
serves a whole call, so a batch whose requests want different max_tokens is
sent as one call per distinct length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from selfhost.bench.record import RequestRecord
from selfhost.bench.runner import Level, LevelRun
from selfhost.bench.workload import BenchRequest
from selfhost.errors import InvalidParameterError, SelfhostError


class OfflineUnavailableError(SelfhostError):
    """Offline mode asked for, but this install has no in-process engine API."""


def load_engine(model: str) -> tuple[Any, Any]:
    """(LLM instance, SamplingParams class) for `model`."""
    try:
        from selfhost import LLM, SamplingParams
    except ImportError:
        raise OfflineUnavailableError(
            "--offline needs the in-process engine (`from selfhost import LLM`), which this install lacks"
        ) from None
    return LLM(model), SamplingParams


def check_levels(levels: Sequence[Level]) -> None:
    for level in levels:
        if level.request_rate is not None or level.concurrency is None:
            raise InvalidParameterError(
                f"--offline runs closed-loop batches; level {level.label} uses --request-rate, which it cannot replay"
            )


def run_offline_levels(
    llm: Any,
    sampling_params_cls: Any,
    requests_by_level: Sequence[Sequence[BenchRequest]],
    levels: Sequence[Level],
    into: list[LevelRun],
    api: str = "chat",
    on_level: Callable[[Level], None] = lambda level: None,
    on_record: Callable[[RequestRecord], None] = lambda record: None,
) -> None:
    """Like runner.run_levels, through `llm.generate`; LevelRuns fill batch by batch."""
    check_levels(levels)
    assert len(requests_by_level) == len(levels), (len(requests_by_level), len(levels))
    for level, requests in zip(levels, requests_by_level):
        run = LevelRun(level)
        into.append(run)
        on_level(level)
        zero_s = time.perf_counter()
        try:
            assert level.concurrency is not None
            for first in range(0, len(requests), level.concurrency):
                batch = requests[first : first + level.concurrency]
                for max_tokens in sorted({r.max_tokens for r in batch}):
                    group = [r for r in batch if r.max_tokens == max_tokens]
                    params = sampling_params_cls(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                    start_s = time.perf_counter()
                    if api == "chat":
                        outputs = llm.chat([r.chat_messages() for r in group], params)
                    else:
                        outputs = llm.generate([r.prompt_text() for r in group], params)
                    end_s = time.perf_counter()
                    for request, output in zip(group, outputs):
                        record = RequestRecord(
                            index=request.index,
                            start_s=start_s - zero_s,
                            end_s=end_s - zero_s,
                            prompt_tokens=len(output.prompt_token_ids),
                            output_tokens=len(output.token_ids),
                            tokens_source="engine",
                        )
                        run.records.append(record)
                        on_record(record)
            run.completed = True
        finally:
            run.duration_s = time.perf_counter() - zero_s
