"""A contiguous KV cache for one sequence.

Keys and values live in one buffer per layer, laid out (kv_heads, max_len,
head_dim) so a decode step reads each head's keys as one contiguous run.
"""

from __future__ import annotations

import torch

from selfhost.layers.attention import attend_one_sequence
from selfhost.models.spec import ModelSpec


class ContiguousKVCache:
    def __init__(self, spec: ModelSpec, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (spec.num_layers, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.num_cached = 0  # tokens whose keys/values are stored
        self._step_start = 0

    def begin_step(self, num_new_tokens: int) -> None:
        assert self.num_cached + num_new_tokens <= self.max_len, (self.num_cached, num_new_tokens, self.max_len)
        self._step_start = self.num_cached

    def end_step(self, num_new_tokens: int) -> None:
        self.num_cached += num_new_tokens

    def truncate(self, num_tokens: int) -> None:
        self.num_cached = min(self.num_cached, num_tokens)

    def attend(self, layer_idx, q, k, v, scale, sliding_window, softcap):
        start, end = self._step_start, self._step_start + q.shape[0]
        self.k[layer_idx, :, start:end] = k.transpose(0, 1)
        self.v[layer_idx, :, start:end] = v.transpose(0, 1)
        # A sliding-window layer never looks further back than its window.
        first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        keys = self.k[layer_idx, :, first:end]
        values = self.v[layer_idx, :, first:end]
        return attend_one_sequence(q, keys, values, start - first, scale, sliding_window, softcap)
