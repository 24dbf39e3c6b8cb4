"""The paged KV cache and the per-step attention over it.

Memory is one tensor per layer of shape (num_blocks, block_size, kv_heads,
head_dim) for keys and the same for values. A step's tokens arrive flat;
`StepMetadata` says where each token's KV goes (`slot_mapping`) and how the
queries group into sequences. Single-token queries (decodes, and the last
token of a prompt) are attended in one padded batch per layer; multi-token
prompt chunks are attended one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfhost.layers.attention import attend_one_sequence
from selfhost.models.spec import ModelSpec


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # (T,) flat cache slot of each token
    # Single-token queries: the first num_single tokens of the step.
    num_single: int
    single_block_tables: torch.Tensor | None  # (S, max_blocks) padded with block 0
    single_context_lens: torch.Tensor | None  # (S,) keys visible to each, including itself
    # Multi-token chunks: (first token index in the step, num tokens, start position, block table)
    chunks: list[tuple[int, int, int, torch.Tensor]]


def batched_single_query_attention(
    q: torch.Tensor,  # (S, H, D)
    k: torch.Tensor,  # (Hkv, S, L, D) keys gathered per sequence, padded to L
    v: torch.Tensor,  # (Hkv, S, L, D)
    context_lens: torch.Tensor,  # (S,)
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, _, max_len, _ = k.shape
    group = num_heads // num_kv_heads
    key_pos = torch.arange(max_len, device=q.device).unsqueeze(0)  # (1, L)
    valid = key_pos < context_lens.unsqueeze(1)  # (S, L)
    if sliding_window is not None:
        valid &= key_pos > (context_lens.unsqueeze(1) - 1 - sliding_window)
    # One batched matmul over (kv head, sequence) pairs; the G query heads that
    # share a kv head are the rows of each product.
    qg = q.view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
    scores = torch.bmm(qg, k.view(-1, max_len, head_dim).transpose(1, 2)).float() * scale  # (Hkv*S, G, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(num_kv_heads, num_seqs, group, max_len).masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(-1, group, max_len)
    out = torch.bmm(probs, v.view(-1, max_len, head_dim))  # (Hkv*S, G, D)
    return out.view(num_kv_heads, num_seqs, group, head_dim).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


class PagedKVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        # Head-major blocks: gathering a sequence's blocks yields each kv head's keys
        # as one contiguous (L, head_dim) run, ready for a batched matmul.
        shape = (spec.num_layers, spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.meta: StepMetadata | None = None

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        return spec.kv_bytes_per_token * block_size * torch.tensor([], dtype=dtype).element_size()

    def attend(self, layer_idx, q, k, v, scale, sliding_window, softcap):
        meta = self.meta
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]  # (Hkv, num_blocks, block_size, D)
        num_kv_heads, num_blocks, block_size, head_dim = k_layer.shape
        # Write this step's keys and values into their slots first: queries see themselves.
        k_layer.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_layer.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        num_single = meta.num_single
        if num_single:
            tables = meta.single_block_tables  # (S, max_blocks)
            padded_len = tables.shape[1] * block_size
            flat = tables.flatten()
            gathered_k = k_layer.index_select(1, flat).view(num_kv_heads, num_single, padded_len, head_dim)
            gathered_v = v_layer.index_select(1, flat).view(num_kv_heads, num_single, padded_len, head_dim)
            out[:num_single] = batched_single_query_attention(
                q[:num_single], gathered_k, gathered_v, meta.single_context_lens, scale, sliding_window, softcap
            )
        for first, num, start, table in meta.chunks:
            end = start + num
            keys = k_layer.index_select(1, table).view(num_kv_heads, -1, head_dim)[:, :end]  # (Hkv, L, D)
            values = v_layer.index_select(1, table).view(num_kv_heads, -1, head_dim)[:, :end]
            out[first : first + num] = attend_one_sequence(
                q[first : first + num], keys, values, start, scale, sliding_window, softcap
            )
        return out
