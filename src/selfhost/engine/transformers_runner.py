"""Runs a scheduled step on a transformers model (the labelled fallback), one sequence at a time.

Each sequence keeps its own transformers cache between steps. A chunk that does
not continue the cache it finds (first chunk, a preempted sequence restarting,
or a prompt whose prefix the block manager found cached) rebuilds the cache
from the sequence's first token, so results never depend on what ran before.
"""

from __future__ import annotations

import inspect

import torch

from selfhost.engine.model_runner import StepResult
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.layers.sampler import sample
from selfhost.models.transformers_fallback import TransformersModel


class _SequenceCache:
    def __init__(self, seq):
        from transformers import DynamicCache

        self.seq = seq
        self.kv = DynamicCache()
        self.length = 0


class TransformersRunner:
    cpu_threads = None  # transformers picks its own threads
    grammars = None  # the engine's GrammarCompiler: masks for rows with an output constraint
    supports_prompt_logprobs = False

    def __init__(self, model: TransformersModel, device: torch.device):
        self.hf_model = model.hf_model
        self.device = device
        # transformers renamed `past_key_values` to `cache`; speak whichever this version's model takes.
        takes = inspect.signature(self.hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in takes else "past_key_values"
        self._caches: dict[int, _SequenceCache] = {}  # id(sequence) -> its cache

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepResult:
        # Caches of sequences that finished or were aborted since the last step are dropped here.
        self._caches = {key: c for key, c in self._caches.items() if c.seq.finish_reason is None}
        finishing, last_logits = [], []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            cache = self._caches.get(id(seq))
            if cache is None or cache.seq is not seq or cache.length != chunk.start:
                cache = self._caches[id(seq)] = _SequenceCache(seq)
            logits = self._forward(cache, seq.token_ids[cache.length : end])
            if chunk.completes_sequence:
                finishing.append(chunk)
                last_logits.append(logits)
        if not finishing:
            return StepResult([], None)
        logits = torch.stack(last_logits).float()
        return StepResult(finishing, sample(logits, [c.seq.sampler_row for c in finishing], self.grammars.step_masks([c.seq.grammar for c in finishing])))

    def _forward(self, cache: _SequenceCache, token_ids: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; return the last position's logits (vocab,)."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(cache.length, cache.length + len(token_ids), device=self.device).unsqueeze(0)
        out = self.hf_model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                            **{self._cache_kwarg: cache.kv})
        cache.length += len(token_ids)
        return out.logits[0, -1]
