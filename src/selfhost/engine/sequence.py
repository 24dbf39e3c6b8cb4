"""One request's state while it is being generated."""

from __future__ import annotations

from selfhost.engine.detokenizer import IncrementalDetokenizer
from selfhost.layers.sampler import Logprobs, SamplerRow
from selfhost.outputs import RequestOutput, TokenLogprob
from selfhost.sampling_params import SamplingParams
from selfhost.tokenizer import Tokenizer


def sampler_row(params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> SamplerRow:
    """The sampler's plain per-row values for one request (it sees the live token lists)."""
    return SamplerRow(
        prompt_ids,
        output_ids,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        num_logprobs=params.logprobs,
        logits_processors=params.logits_processors,
        seed=params.seed,  # the sampler makes the generator on the logits' device
    )


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_output: int,
    ):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = list(prompt_ids)  # prompt + output, what the KV cache holds
        self.output_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, params.stop)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # Grows as prefill chunks are scored; the first prompt token has no logprob.
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.max_output = max_output  # max_tokens, capped by the engine at the context window
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
        self.sampler_row = sampler_row(params, prompt_ids, self.output_ids)
        # Fixed by the params: the decode path checks it every step for every row (model_runner.py).
        self.plain_greedy = self.sampler_row.is_plain_greedy
        # llguidance matcher of params.structured_output, set by the engine; it has seen every output token.
        self.grammar = None
        # KV bookkeeping, owned by the scheduler and block manager.
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # digest of each full, committed block
        self.cache_root: bytes | None = None  # parent digest of the first block: its prefix-cache scope
        self.lora_name: str | None = None  # the adapter it asked for; None: the base model
        self.lora_slot: int | None = None  # the slot holding that adapter, taken at admission (lora/serving.py)
        self.num_computed_tokens = 0
        # Prompt tokens its first admission found in the prefix cache (OpenAI's usage.cached_tokens).
        self.num_cached_prompt_tokens = 0
        self.num_preemptions = 0
        # Speculative decoding (speculative/speculator.py): tokens proposed for the next step, and
        # the speculator's own per-sequence state (proposal length, draft-model cache).
        self.proposed: list[int] = []
        self.speculation = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and some prompt tokens are not scored yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprob: Logprobs | None) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(TokenLogprob(token_id, logprob[0], dict(logprob[1])))
        if token_id in self.stop_ids:
            # A stop token ends the text but is not part of it.
            self.finish_reason = "stop"
            self.detok.flush()
            return
        self.detok.add(token_id)
        if self.detok.stopped:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_output:
            self.finish_reason = "length"
            self.detok.flush()

    def extend(self, token_ids: list[int], logprobs: list[Logprobs | None]) -> None:
        """`append` each of a verified speculative run's tokens, stopping where the sequence finishes.

        Where none of them can finish it (no stop token or stop string, max_tokens beyond the run) their
        text is decoded in one go: the same text, without two decodes per token."""
        if (len(token_ids) < 2 or self.detok.stop or len(self.output_ids) + len(token_ids) >= self.max_output
                or not self.stop_ids.isdisjoint(token_ids)):
            for token_id, logprob in zip(token_ids, logprobs):
                self.append(token_id, logprob)
                if self.is_finished:
                    break
            return
        self.output_ids.extend(token_ids)
        self.token_ids.extend(token_ids)
        if self.logprobs is not None:
            self.logprobs.extend(TokenLogprob(token_id, logprob[0], dict(logprob[1]))
                                 for token_id, logprob in zip(token_ids, logprobs) if logprob is not None)
        self.detok.add_many(token_ids)

    def finish_constrained(self) -> None:
        """The output constraint is complete: nothing more may follow it."""
        self.finish_reason = "stop"
        self.detok.flush()

    def take_delta(self) -> str:
        return self.detok.take_delta(final=self.is_finished)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            text=self.detok.text,
            token_ids=list(self.output_ids),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            num_cached_tokens=self.num_cached_prompt_tokens,
        )
