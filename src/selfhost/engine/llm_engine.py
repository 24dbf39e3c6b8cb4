"""LLMEngine: requests in, one scheduled batch per `step()`, outputs out.

Owns the paged KV cache (sized once from the memory budget), the block
manager, the scheduler and the model runner. Not thread-safe: AsyncEngine
drives it from a single worker thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from selfhost.engine.block_manager import BlockManager, cache_root
from selfhost.engine.config import EngineConfig
from selfhost.engine.grammar import GrammarCompiler
from selfhost.engine.model_runner import ModelRunner
from selfhost.engine.transformers_runner import TransformersRunner
from selfhost.engine.kv_stores import kv_cache_type
from selfhost.engine.scheduler import ScheduledChunk, Scheduler
from selfhost.engine.sequence import Sequence
from selfhost.engine.validation import RequestLimits, validate_request
from selfhost.errors import InvalidParameterError
from selfhost.host_memory import available_memory_bytes
from selfhost.lora.errors import AdapterSlotsBusyError
from selfhost.models.bf16_weights import linear_kernels, weight_dtype_name
from selfhost.models.decoder import CausalLM
from selfhost.sampling_params import SamplingParams
from selfhost.tokenizer import Tokenizer

if TYPE_CHECKING:
    from selfhost.lora.serving import AdapterSlots
    from selfhost.speculative.config import SpeculativeConfig

log = logging.getLogger("selfhost.engine")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_hit_rate: float
    tokens_last_step: int
    num_steps: int
    num_preemptions: int
    # The hit rate's parts: prompt tokens admitted, and those served from the prefix cache (they add up across engines).
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    # CPU only: BLAS threads the engine settled on for small (decode) and large (prefill, big batch) steps.
    cpu_threads_small_steps: int | None = None
    cpu_threads_large_steps: int | None = None
    # Precision and the kernels it runs on (weight_dtype="auto" picks by measuring on this CPU).
    weight_dtype: str | None = None
    kv_cache_dtype: str | None = None
    linear_kernels: str | None = None
    # Speculative decoding (None when off): proposed and accepted tokens, sequence-steps that verified a proposal.
    speculative_method: str | None = None
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0
    spec_acceptance_rate: float = 0.0
    spec_mean_accepted_length: float = 0.0  # tokens appended per verification, the target's own included


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for the KV cache on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_memory_bytes()


def plan_num_blocks(config: EngineConfig, model: CausalLM, dtype: torch.dtype, device: torch.device) -> int:
    budget = config.kv_cache_bytes_or_fraction
    if isinstance(budget, float):
        budget = int(free_memory_bytes(device) * budget)
    per_block = kv_cache_type(model.spec).bytes_per_block(model.spec, config.block_size, dtype)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise InvalidParameterError(
            f"kv_cache_memory={config.kv_cache_memory!r} holds no KV block ({per_block} bytes each)"
        )
    return num_blocks


class LLMEngine:
    def __init__(
        self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig, dtype: torch.dtype, device: torch.device,
        kv_dtype: torch.dtype | None = None, adapters: AdapterSlots | None = None,
        speculative: SpeculativeConfig | None = None, draft_model: CausalLM | None = None,
    ):
        """dtype: the activations'; kv_dtype: what the KV cache stores (default: dtype);
        adapters: LoRA adapters requests may name (already wrapped around `model`'s projections);
        speculative: speculative decoding's settings, with the loaded `draft_model` for method "draft"."""
        self.model = model
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.config = config
        self.kv_dtype = kv_dtype = kv_dtype or dtype
        self.weight_dtype = weight_dtype_name(model, dtype)
        self.linear_kernels = linear_kernels(model)
        num_blocks = plan_num_blocks(config, model, kv_dtype, device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self._take_adapter_slot if adapters is not None else None)
        if getattr(model, "owns_kv_cache", False):
            # The transformers fallback keeps its own caches; blocks still meter their memory.
            self.cache = None
            self.runner = TransformersRunner(model, device)
        else:
            # Latent rows for latent attention (DeepSeek), torch attention for sinks (gpt-oss), else the C kernels.
            self.cache = kv_cache_type(model.spec)(model.spec, num_blocks, config.block_size, dtype, device, kv_dtype)
            self.runner = ModelRunner(model, self.cache, device)
        self.grammars = GrammarCompiler(tokenizer, model.spec.vocab_size, tokenizer.eos_token_ids)
        self.runner.grammars = self.grammars
        self.runner.adapters = adapters
        self.capacity_tokens = num_blocks * config.block_size
        self.limits = RequestLimits(
            vocab_size=model.spec.vocab_size,
            max_model_len=model.max_len,
            kv_capacity_tokens=self.capacity_tokens,
            supports_prompt_logprobs=self.runner.supports_prompt_logprobs,
        )
        self.speculator = self._make_speculator(speculative, draft_model, num_blocks, dtype, device)
        self.sequences: dict[str, Sequence] = {}
        self._unadmittable: list[Sequence] = []  # waiting requests whose adapter can no longer be loaded
        self._tokens_last_step = 0
        self._num_steps = 0
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s)",
            num_blocks,
            config.block_size,
            self.capacity_tokens,
            num_blocks * kv_cache_type(model.spec).bytes_per_block(model.spec, config.block_size, kv_dtype) / 2**30,
            str(kv_dtype).removeprefix("torch."),
        )

    def _make_speculator(self, config: SpeculativeConfig | None, draft_model: CausalLM | None, num_blocks: int,
                         dtype: torch.dtype, device: torch.device):
        if config is None:
            return None
        from selfhost.speculative.draft import DraftProposer
        from selfhost.speculative.speculator import Speculator

        if self.cache is None:
            raise InvalidParameterError("speculative decoding runs on selfhost's own model, not the transformers "
                                        "fallback", param="speculative")
        draft = None
        if config.method == "draft":
            if draft_model is None:
                raise InvalidParameterError("speculative method 'draft' needs the loaded draft model", param="speculative")
            # As many tokens of draft KV as of target KV: the draft model's blocks are smaller.
            draft = DraftProposer(draft_model, num_blocks, self.config.block_size, dtype, device)
        return Speculator(config, draft)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the typed error `add_request` would raise; any thread may call it.

        Reads only fixed limits, and compiles the output constraint into the shared cache,
        so a server that validates on its own threads spares the engine thread the compile.
        """
        validate_request(prompt_ids, params, self.limits)
        if params.structured_output is not None:
            self.grammars.matcher(params.structured_output)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: bytes | None = None, lora: str | None = None) -> Sequence:
        """Validate and queue a request; it joins the running batch at the next step with room.

        Requests reuse each other's cached prefix blocks only when their `cache_salt` is the same
        (and their adapter: `lora` names one of the engine's adapters; None is the base model).
        """
        if request_id in self.sequences:
            raise InvalidParameterError(f"request id {request_id!r} is already running", param="request_id")
        if lora is not None and self.adapters is None:
            raise InvalidParameterError(f"adapter {lora!r} requested, but this engine serves no adapters",
                                        param="lora")
        self.validate_request(prompt_ids, params)
        max_output = self.limits.output_budget(len(prompt_ids), params.max_tokens)
        seq = Sequence(request_id, list(prompt_ids), params, self.tokenizer, max_output)
        if lora is not None:
            # An unknown name, an unreadable folder, a rank too high: refused now, not at admission.
            self.adapters.prefetch(lora)
            seq.lora_name = lora  # its slot is taken when it is admitted (_take_adapter_slot)
            # Another adapter's keys and values differ: its cached prefixes are its own.
            cache_salt = (cache_salt or b"") + b"\0lora\0" + lora.encode()
        seq.cache_root = cache_root(cache_salt)
        if params.structured_output is not None:
            seq.grammar = self.grammars.matcher(params.structured_output)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
            self._release(seq)
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        return seq

    @property
    def last_step_was_empty(self) -> bool:
        """The last step found nothing it could run (its waiting requests wait for an adapter slot)."""
        return self._tokens_last_step == 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Sequence]:
        """Run one batch; return the sequences that got new tokens (finished ones included)."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.config.max_num_batched_tokens)
        chunks = self.scheduler.schedule()
        aborted = [self.abort(seq.request_id) for seq in self._unadmittable]
        self._unadmittable.clear()
        if not chunks:
            self._tokens_last_step = 0
            return [seq for seq in aborted if seq is not None]
        started = time.perf_counter()
        result = self.runner.run(chunks)
        forward_seconds = time.perf_counter() - started
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        for seq, scored in result.prompt_logprobs:
            seq.prompt_logprobs.extend(scored)
        updated = [seq for seq in aborted if seq is not None]
        if result.sampled is not None:
            sampled = result.sampled
            for chunk, token_id, logprob in zip(result.finishing, sampled.token_ids, sampled.logprobs):
                seq = chunk.seq
                seq.append(token_id, logprob)
                updated.append(seq)
            self._advance_grammars(updated)
        for chunk, logits, argmax in result.verifying:
            self._accept_verified(chunk, logits, argmax)
            updated.append(chunk.seq)
        for chunk in chunks:
            self.block_manager.commit_full_blocks(chunk.seq)
        for seq in updated:
            if seq.is_finished:
                self.scheduler.finish(seq)
                self.sequences.pop(seq.request_id, None)
                self._release(seq)
        self._tokens_last_step = sum(c.num_tokens for c in chunks)
        self._num_steps += 1
        if self.speculator is not None:
            self.speculator.record_step(chunks, forward_seconds)
        return updated

    def _accept_verified(self, chunk: ScheduledChunk, logits: torch.Tensor, argmax: list[int] | None) -> None:
        """Append what the verification kept; roll the cache back past the last accepted proposal."""
        seq = chunk.seq
        tokens, logprobs = self.speculator.verify(seq, chunk.proposed, logits, argmax)
        seq.extend(tokens, logprobs)  # a stop token or string, or max_tokens, may end it inside the run
        # KV is valid for the sequence's own token and the accepted proposals; the last token appended
        # (the target's own) has none yet, exactly as after a plain decode step.
        seq.num_computed_tokens = chunk.start + chunk.num_own_tokens + len(tokens) - 1
        self.block_manager.trim(seq)

    def _take_adapter_slot(self, seq: Sequence) -> bool:
        """Admission of a request for an adapter: it waits while every slot runs other adapters."""
        if seq.lora_name is None or seq.lora_slot is not None:
            return True
        try:
            seq.lora_slot = self.adapters.acquire(seq.lora_name)
        except AdapterSlotsBusyError:
            return False
        except Exception:  # removed, or its folder became unreadable, since it was queued
            log.exception("adapter %r could not be loaded for request %s", seq.lora_name, seq.request_id)
            self._unadmittable.append(seq)
            return False
        return True

    def _release(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = None
        if self.speculator is not None:
            self.speculator.release(seq)

    def _advance_grammars(self, updated: list[Sequence]) -> None:
        # A sequence that just ended (a stop token or string, its length) needs no further mask.
        constrained = [seq for seq in updated if seq.grammar is not None and not seq.is_finished]
        if not constrained:
            return
        self.grammars.advance([seq.grammar for seq in constrained], [seq.output_ids[-1] for seq in constrained])
        for seq in constrained:
            if seq.grammar.is_stopped():
                seq.finish_constrained()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        threads = self.runner.cpu_threads
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used,
            kv_blocks_free=bm.num_free,
            kv_blocks_total=bm.num_blocks,
            prefix_hit_rate=bm.prefix_hit_rate,
            tokens_last_step=self._tokens_last_step,
            num_steps=self._num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queried_tokens=bm.prefix_queried_tokens,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            cpu_threads_small_steps=threads.small_steps.current if threads else None,
            cpu_threads_large_steps=threads.large_steps.current if threads else None,
            weight_dtype=self.weight_dtype,
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            linear_kernels=self.linear_kernels,
            **self._speculation_stats(),
        )

    def _speculation_stats(self) -> dict:
        if self.speculator is None:
            return {}
        spec = self.speculator.stats()
        return dict(
            speculative_method=self.speculator.config.method,
            spec_proposed_tokens=spec.proposed_tokens,
            spec_accepted_tokens=spec.accepted_tokens,
            spec_verifications=spec.verifications,
            spec_acceptance_rate=spec.acceptance_rate,
            spec_mean_accepted_length=spec.mean_accepted_length,
        )
