"""One request check at the engine boundary: typed errors that name the value, the limit and the field."""

from __future__ import annotations

import pytest

from selfhost import SamplingParams
from selfhost.engine.validation import RequestLimits, validate_request
from selfhost.errors import ContextLengthError, InvalidParameterError

LIMITS = RequestLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=48, supports_prompt_logprobs=False)


@pytest.mark.parametrize(
    "prompt, params, error, param, needle",
    [
        ([], SamplingParams(), InvalidParameterError, "prompt", "empty"),
        ([1, 100, 2], SamplingParams(), InvalidParameterError, "prompt", "token id 100 is outside the vocabulary"),
        ([-1], SamplingParams(), InvalidParameterError, "prompt", "token id -1"),
        ([1] * 64, SamplingParams(), ContextLengthError, "prompt", "64 tokens; the model's context window is 64"),
        ([1] * 48, SamplingParams(max_tokens=1), ContextLengthError, "prompt", "the KV cache holds 48"),
        ([1] * 40, SamplingParams(max_tokens=9), ContextLengthError, "max_tokens", "max_tokens=9"),
        ([1] * 4, SamplingParams(prompt_logprobs=1), InvalidParameterError, "prompt_logprobs", "transformers fallback"),
    ],
)
def test_bad_requests_raise_typed_errors_naming_the_field(prompt, params, error, param, needle):
    with pytest.raises(error) as excinfo:
        validate_request(prompt, params, LIMITS)
    assert excinfo.value.param == param
    assert needle in str(excinfo.value)


def test_max_tokens_is_capped_at_the_context_window_not_refused():
    # The offline API's default max_tokens may pass the window: generation stops there instead.
    validate_request([1] * 40, SamplingParams(max_tokens=8), LIMITS)
    roomy = RequestLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=1000, supports_prompt_logprobs=True)
    validate_request([1] * 40, SamplingParams(max_tokens=500), roomy)
    assert roomy.output_budget(40, 500) == 24
    assert LIMITS.room_for_output(40) == 8


def test_add_request_uses_the_same_check(tiny_llm):
    engine = tiny_llm.engine
    with pytest.raises(ContextLengthError) as excinfo:
        engine.add_request("too-long", [5] * tiny_llm.max_model_len, SamplingParams())
    assert excinfo.value.param == "prompt" and not engine.sequences
