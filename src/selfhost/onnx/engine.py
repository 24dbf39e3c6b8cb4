"""OnnxEngine: LLMEngine's request interface over an ONNX Runtime decoder, one sequence at a time.

`LLM(DIR)` on a folder written by `selfhost export onnx` drives this instead of
LLMEngine, so `generate`, `stream`, `chat`, `selfhost run` and AsyncEngine (and
with it `selfhost bench --offline`) work unchanged. No batching: each step
advances the oldest unfinished request by one token (its whole prompt on its
first step), with each request's KV cache held as the decoder's last `present`
tensors. Sampling is selfhost's own sampler, so SamplingParams mean the same on
both runtimes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfhost.engine.llm_engine import EngineStats
from selfhost.engine.sequence import Sequence
from selfhost.engine.validation import RequestLimits, validate_request
from selfhost.errors import InvalidParameterError
from selfhost.layers.sampler import sample
from selfhost.onnx.decoder import KVCache, OnnxDecoder
from selfhost.sampling_params import SamplingParams
from selfhost.tokenizer import Tokenizer


class OnnxEngine:
    def __init__(self, folder: Path, tokenizer: Tokenizer, max_model_len: int | None = None):
        self.model = OnnxDecoder(folder)
        self.tokenizer = tokenizer
        self.max_model_len = min(max_model_len or self.model.max_len, self.model.max_len)
        self.limits = RequestLimits(
            vocab_size=self.model.info.vocab_size, max_model_len=self.max_model_len,
            kv_capacity_tokens=self.max_model_len, supports_prompt_logprobs=True,  # refused below, with our reason
        )
        self.sequences: dict[str, Sequence] = {}  # insertion order: the oldest is served first
        self._caches: dict[str, KVCache] = {}
        self._num_steps = 0
        self._tokens_last_step = 0

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if params.prompt_logprobs is not None:
            raise InvalidParameterError("prompt logprobs are not available from an ONNX export's runner",
                                        param="prompt_logprobs")
        if params.structured_output is not None:  # this runner does not constrain sampling
            raise InvalidParameterError("structured output is not available from an ONNX export's runner",
                                        param="structured_output")
        validate_request(prompt_ids, params, self.limits)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: bytes | None = None, lora: str | None = None) -> Sequence:
        """As LLMEngine.add_request; there is no prefix cache here, so `cache_salt` has no use."""
        if lora is not None:
            raise InvalidParameterError(f"adapter {lora!r} requested: an ONNX export's runner serves no adapters "
                                        "(merge it first: selfhost merge, then export)", param="lora")
        if request_id in self.sequences:
            raise InvalidParameterError(f"request id {request_id!r} is already running", param="request_id")
        self.validate_request(prompt_ids, params)
        max_output = self.limits.output_budget(len(prompt_ids), params.max_tokens)
        seq = Sequence(request_id, list(prompt_ids), params, self.tokenizer, max_output)
        self.sequences[request_id] = seq
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.sequences.pop(request_id, None)
        self._caches.pop(request_id, None)
        if seq is not None and seq.finish_reason is None:
            seq.finish_reason = "abort"
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.sequences)

    def step(self) -> list[Sequence]:
        """One token for the oldest unfinished request; returns it (empty when idle)."""
        if not self.sequences:
            return []
        seq = next(iter(self.sequences.values()))
        cache = self._caches.get(seq.request_id)
        if cache is None:  # first step: the whole prompt
            new_ids, cache = seq.token_ids, self.model.empty_cache()
        else:
            new_ids = seq.token_ids[-1:]
        logits, self._caches[seq.request_id] = self.model.forward(new_ids, cache)
        result = sample(torch.from_numpy(logits[-1:]), [seq.sampler_row])
        seq.append(result.token_ids[0], result.logprobs[0])
        if seq.is_finished:
            self.sequences.pop(seq.request_id)
            self._caches.pop(seq.request_id)
        self._tokens_last_step = len(new_ids)
        self._num_steps += 1
        return [seq]

    def stats(self) -> EngineStats:
        running = len(self.sequences)
        return EngineStats(
            num_running=min(running, 1), num_waiting=max(running - 1, 0), kv_blocks_used=0, kv_blocks_free=0,
            kv_blocks_total=0, prefix_hit_rate=0.0, tokens_last_step=self._tokens_last_step,
            num_steps=self._num_steps, num_preemptions=0, weight_dtype=self.model.info.quant or self.model.info.dtype,
            kv_cache_dtype=self.model.info.dtype, linear_kernels="onnxruntime",
        )
