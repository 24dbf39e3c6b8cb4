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
import torch.nn.functional as F

from selfhost.layers.attention import attend_one_sequence
from selfhost.models.spec import ModelSpec


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # (T,) flat cache slot of each token
    # Single-token queries: the first num_single tokens of the step.
    num_single: int
    single_block_tables: torch.Tensor | None  # (S, max_blocks) padded with block 0
    single_context_lens: torch.Tensor | None  # (S,) keys visible to each, including itself
    single_max_len: int
    # Multi-token chunks: (first token index in the step, num tokens, start position, block table)
    chunks: list[tuple[int, int, int, torch.Tensor]]


def batched_single_query_attention(
    q: torch.Tensor,  # (S, H, D)
    k: torch.Tensor,  # (S, L, Hkv, D) keys gathered per sequence, padded to L
    v: torch.Tensor,
    context_lens: torch.Tensor,  # (S,)
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    max_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    key_pos = torch.arange(max_len, device=q.device).unsqueeze(0)  # (1, L)
    valid = key_pos < context_lens.unsqueeze(1)  # (S, L)
    if sliding_window is not None:
        valid &= key_pos > (context_lens.unsqueeze(1) - 1 - sliding_window)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)  # queries of one kv head side by side
    kt = k.permute(0, 2, 1, 3)  # (S, Hkv, L, D)
    vt = v.permute(0, 2, 1, 3)
    mask = valid[:, None, None, :]  # (S, 1, 1, L)
    if softcap is None:
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qg, kt.transpose(-1, -2)).float() * scale  # (S, Hkv, G, L)
        scores = torch.tanh(scores / softcap) * softcap
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, vt)
    return out.reshape(num_seqs, num_heads, head_dim)


class PagedKVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.meta: StepMetadata | None = None

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        return spec.kv_bytes_per_token * block_size * torch.tensor([], dtype=dtype).element_size()

    def attend(self, layer_idx, q, k, v, scale, sliding_window, softcap):
        meta = self.meta
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        # Write this step's keys and values into their slots first: queries see themselves.
        k_layer.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_layer.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        num_single = meta.num_single
        if num_single:
            tables = meta.single_block_tables  # (S, max_blocks)
            gathered_k = k_layer[tables].flatten(1, 2)[:, : meta.single_max_len]  # (S, L, Hkv, D)
            gathered_v = v_layer[tables].flatten(1, 2)[:, : meta.single_max_len]
            out[:num_single] = batched_single_query_attention(
                q[:num_single], gathered_k, gathered_v, meta.single_context_lens, scale, sliding_window, softcap
            )
        for first, num, start, table in meta.chunks:
            end = start + num
            keys = k_layer[table].flatten(0, 1)[:end].transpose(0, 1)  # (Hkv, L, D)
            values = v_layer[table].flatten(0, 1)[:end].transpose(0, 1)
            out[first : first + num] = attend_one_sequence(
                q[first : first + num], keys, values, start, scale, sliding_window, softcap
            )
        return out
