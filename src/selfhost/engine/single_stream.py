"""Generate for one sequence at a time over a contiguous KV cache.

The hot loop is: one forward over the new token(s), logits for the last
position only, sample, one host transfer of the chosen id. Setup (cache
allocation) happens once per sequence, outside the loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from selfhost.engine.kv_cache import ContiguousKVCache
from selfhost.engine.sequence import Sequence
from selfhost.layers.sampler import sample
from selfhost.models.decoder import CausalLM


class SingleStreamEngine:
    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        self._cache: ContiguousKVCache | None = None

    def _cache_for(self, num_tokens: int) -> ContiguousKVCache:
        # Reuse one buffer across requests; grow it (to a power of two) only when needed.
        if self._cache is None or self._cache.max_len < num_tokens:
            size = min(self.model.max_len, 1 << max(num_tokens - 1, 1).bit_length())
            self._cache = ContiguousKVCache(self.model.spec, size, self.dtype, self.device)
        self._cache.truncate(0)
        return self._cache

    @torch.inference_mode()
    def _forward(self, kv: ContiguousKVCache, token_ids: list[int], start: int) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)
        kv.begin_step(len(token_ids))
        hidden = self.model(ids, positions, kv)
        kv.end_step(len(token_ids))
        return self.model.compute_logits(hidden[-1:])

    def stream(self, seq: Sequence) -> Iterator[Sequence]:
        """Yield `seq` after every generated token until it finishes."""
        kv = self._cache_for(len(seq.prompt_ids) + seq.max_output)
        logits = self._forward(kv, seq.prompt_ids, 0)
        while True:
            result = sample(logits, [seq.sampler_row])
            seq.append(result.token_ids[0], result.logprobs[0])
            yield seq
            if seq.is_finished:
                return
            logits = self._forward(kv, seq.output_ids[-1:], seq.num_tokens - 1)
