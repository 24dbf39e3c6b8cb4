"""SamplingParams: how one request chooses its tokens and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfhost.errors import InvalidParameterError
from selfhost.structured_output import StructuredOutput

MAX_LOGPROBS = 20
# torch.Generator.manual_seed's range: a signed or unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`: distinct per choice, always in range."""
    return (seed + choice - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. `stop` strings end generation and are not part
    of the returned text. `logprobs=k` returns the chosen token's log
    probability plus the k most likely alternatives at each step (k may be 0).
    `prompt_logprobs=k` does the same for every prompt token given its prefix
    (the first token has none); such a request computes its whole prompt
    rather than reusing prefix-cached blocks. `structured_output` constrains
    the text to a JSON schema, a regex, a choice or a grammar (see
    selfhost.structured_output); generation stops when the constraint is complete.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Callables (output_ids, logits_row) -> logits_row applied before sampling,
    # e.g. the server's JSON mode masking tokens that would break the JSON.
    logits_processors: tuple = ()
    structured_output: StructuredOutput | None = None

    def __post_init__(self):
        # Accept a single string or any sequence for the tuple fields.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "None or an integer >= 1")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "a number > 0")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "a number in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "a number in [-2, 2]")
        _check(all(s for s in stop), "stop", stop, "non-empty strings")
        _check(self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
               self.seed, f"None or an integer in [{SEED_MIN}, {SEED_MAX}]")
        _check(self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
               "structured_output", self.structured_output, "None or a selfhost.StructuredOutput")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            self.logprobs,
            f"None or an integer in [0, {MAX_LOGPROBS}]",
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
            "prompt_logprobs",
            self.prompt_logprobs,
            f"None or an integer in [0, {MAX_LOGPROBS}]",
        )
