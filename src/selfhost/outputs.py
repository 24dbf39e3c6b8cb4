"""What generation returns to callers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of the chosen token and the most likely alternatives (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class RequestOutput:
    """The result of one prompt. `finish_reason` is "stop" or "length" once finished.

    `prompt_logprobs` (when asked for) has one entry per prompt token, None for
    the first, which has no prefix to be predicted from.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StreamDelta:
    """What one request gained in one engine step (AsyncEngine.generate yields these)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    # Set on a request's first delta only, when its params ask for prompt logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
