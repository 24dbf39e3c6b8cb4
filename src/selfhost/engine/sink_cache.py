"""The paged KV cache for attention with sinks (gpt-oss): PagedKVCache's memory, torch attention.

Keys and values live exactly as in `PagedKVCache` (same blocks, same byte count, so the block
manager, preemption and prefix caching are unchanged), but attention goes through
layers/sink_attention.py: the C kernels have no sink term, so they are switched off for this
cache (`use_cpu_kernel` False also makes speculative verifications arrive as chunks).
"""

from __future__ import annotations

import torch

from selfhost.engine.paged_cache import PagedKVCache
from selfhost.layers.sink_attention import attend_one_sequence_with_sinks, single_queries_with_sinks
from selfhost.models.spec import ModelSpec


class SinkKVCache(PagedKVCache):
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None):
        super().__init__(spec, num_blocks, block_size, dtype, device, kv_dtype)
        self.use_cpu_kernel = self.use_prefill_kernel = False

    def attend_with_sinks(self, layer_idx, q, k, v, sinks, scale, sliding_window):
        """As `PagedKVCache.attend` (q, k, v: (T, heads, D)), with one sink logit per query head."""
        meta = self.meta
        num_kv_heads = self.num_kv_heads
        self.write_step_kv(layer_idx, k, v)  # as PagedKVCache.attend does
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_single = meta.num_single
        if num_single:
            keys, values = self.single_keys_values(layer_idx, q.dtype)
            mask = meta.single_query_mask(num_kv_heads, keys.shape[2], sliding_window)
            out[:num_single] = single_queries_with_sinks(q[:num_single], keys, values, mask, scale, sinks)
        for first, num, start, table in meta.chunks:
            keys, values = self.chunk_keys_values(layer_idx, k, v, first, num, start, table, q.dtype)
            out[first : first + num] = attend_one_sequence_with_sinks(
                q[first : first + num], keys, values, start, scale, sliding_window, sinks
            )
        return out
