"""What one request measured: the unit every statistic is computed from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Why a request failed. Kinds, not messages, are what reports count; "engine"
# is offline mode's in-process engine refusing or failing a request.
ERROR_KINDS = ("timeout", "http", "stream", "connect", "transport", "engine")

# Where token counts came from, best first: the server's `usage`, a local
# tokenizer, (last resort) one token per streamed chunk / the planned length,
# or the in-process engine's own token ids (offline mode).
TOKEN_SOURCES = ("usage", "tokenizer", "chunks", "engine")


@dataclass(frozen=True)
class RequestRecord:
    """Timings are seconds on a monotonic clock, `start_s`/`end_s` relative to
    the start of the level. `itl_s` holds the gaps between successive chunks
    that carried text (one token each on vLLM, llama.cpp and Ollama)."""

    index: int
    start_s: float
    end_s: float
    error: str | None = None
    error_detail: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tokens_source: str = "usage"

    def __post_init__(self) -> None:
        if self.error is not None and self.error not in ERROR_KINDS:
            raise ValueError(f"error kind {self.error!r} is not one of {ERROR_KINDS}")
        if self.tokens_source not in TOKEN_SOURCES:
            raise ValueError(f"tokens_source {self.tokens_source!r} is not one of {TOKEN_SOURCES}")
        assert self.end_s >= self.start_s, (self.start_s, self.end_s)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["itl_s"] = list(self.itl_s)
        out["e2e_s"] = self.e2e_s
        out["tpot_s"] = self.tpot_s
        return out
