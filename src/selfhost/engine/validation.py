"""The one check of a request against the engine's limits.

LLMEngine.add_request runs it before a request is queued; the server runs the
same check while preparing a request, so a bad one is a 400 before any stream
starts. Every error names the value and the limit, and its `param` says which
request field is at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.errors import ContextLengthError, InvalidParameterError
from selfhost.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # the context window, in tokens
    kv_capacity_tokens: int  # tokens the whole KV cache holds
    supports_prompt_logprobs: bool

    def output_budget(self, prompt_len: int, max_tokens: int) -> int:
        """Tokens a request may generate: `max_tokens`, but never past the context window."""
        return min(max_tokens, self.max_model_len - prompt_len)

    def room_for_output(self, prompt_len: int) -> int:
        """The most tokens any request with this prompt could generate (context window and KV cache)."""
        return min(self.max_model_len, self.kv_capacity_tokens) - prompt_len


def validate_request(prompt_ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raise a typed error if the engine could not run this request to its end."""
    if not prompt_ids:
        raise InvalidParameterError("the prompt is empty: it must contain at least one token", param="prompt")
    vocab = limits.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:  # builtins: fast on long prompts
        bad = next(t for t in prompt_ids if not 0 <= t < vocab)
        raise InvalidParameterError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    num = len(prompt_ids)
    window = limits.max_model_len
    if num >= window:
        raise ContextLengthError(
            f"the prompt has {num} tokens; the model's context window is {window} tokens (at most {window - 1} "
            "for the prompt, leaving one to generate)",
            param="prompt",
        )
    if params.prompt_logprobs is not None and not limits.supports_prompt_logprobs:
        raise InvalidParameterError(
            f"prompt logprobs (prompt_logprobs={params.prompt_logprobs}) are not available with the transformers "
            "fallback",
            param="prompt_logprobs",
        )
    capacity = limits.kv_capacity_tokens
    if num + 1 > capacity:
        raise ContextLengthError(
            f"the prompt has {num} tokens; the KV cache holds {capacity} (raise kv_cache_memory)", param="prompt"
        )
    worst_case = num + limits.output_budget(num, params.max_tokens)
    if worst_case > capacity:
        raise ContextLengthError(
            f"max_tokens={params.max_tokens} with the prompt's {num} tokens needs up to {worst_case} tokens of KV "
            f"cache; the cache holds {capacity} (raise kv_cache_memory or lower max_tokens to at most "
            f"{capacity - num})",
            param="max_tokens",
        )
