"""The paged cache of multi-head latent attention (DeepSeek V2/V3): one latent row per token.

Per layer and token it keeps kv_lora_rank + qk_rope_head_dim numbers, the normalised latent and
the rotated rope key shared by all heads, instead of every head's key and value: DeepSeek-V3's
576 numbers a token and layer against 128 heads x (192 + 128) for full keys and values. Memory is
one tensor (layers, num_blocks * block_size, rank + rope); blocks are the same paged units the
block manager hands out, so block tables, preemption and prefix caching work unchanged.

A step's tokens arrive as for `PagedKVCache` (`StepMetadata`, same layout):
- single-token queries (decodes; a prompt's last token) attend in the absorbed form, all at once:
  their blocks are gathered into one (S, L, rank + rope) batch and read as keys and values of
  multi-query attention (layers/latent_attention.absorbed_attention); no head's keys are rebuilt;
- prompt chunks expand their latents into per-head keys and values (the up-projection runs once
  per chunk over its context) and attend like any prompt.
Torch ops throughout; no C kernel reads this layout (`use_cpu_kernel` is False, so speculative
verifications arrive as chunks).
"""

from __future__ import annotations

import torch

from selfhost.engine.paged_cache import StepMetadata
from selfhost.engine.zeroed_memory import zeros_on_demand
from selfhost.layers.latent_attention import LatentAttention, absorbed_attention, expanded_attention
from selfhost.models.spec import ModelSpec


class LatentKVCache:
    use_cpu_kernel = False  # the fused C decode kernel reads PagedKVCache's layout only

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None):
        """dtype: the activations' (queries, outputs); kv_dtype: what the cache stores (default: dtype)."""
        assert spec.is_mla, spec.architecture
        self.rank = spec.kv_lora_rank
        width = spec.kv_lora_rank + spec.qk_rope_head_dim
        # (layers, slots, rank + rope): [latent | rope key] rows; on CPU, pages mapped as they fill
        self.entries = zeros_on_demand((spec.num_layers, num_blocks * block_size, width), kv_dtype or dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.meta: StepMetadata | None = None

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        width = spec.kv_lora_rank + spec.qk_rope_head_dim
        return spec.num_layers * width * block_size * torch.tensor([], dtype=dtype).element_size()

    def _blocks(self, layer_idx: int) -> torch.Tensor:
        return self.entries[layer_idx].view(self.num_blocks, self.block_size, -1)  # (num_blocks, block_size, width)

    def attend_latent(self, layer_idx, q_nope, q_rope, latent, k_rope, attn: LatentAttention, scale):
        meta = self.meta
        rows = torch.cat([latent, k_rope], dim=-1)  # (T, rank + rope)
        layer = self.entries[layer_idx]
        # Write first: every query sees its own token.
        layer.index_copy_(0, meta.slot_mapping, rows.to(layer.dtype))
        num_single = meta.num_single
        num_heads, v_dim = q_nope.shape[1], attn.v_dim
        out = torch.empty(q_nope.shape[0], num_heads, v_dim, dtype=q_nope.dtype, device=q_nope.device)
        if num_single:
            tables = meta.single_block_tables  # (S, max_blocks)
            entries = self._blocks(layer_idx).index_select(0, tables.flatten())
            entries = entries.view(num_single, -1, rows.shape[1]).to(q_nope.dtype)  # (S, L, rank + rope)
            mask = meta.single_query_mask(1, entries.shape[1], None)  # (S, 1, L)
            w_uk, w_uv = attn.absorbed_weights()
            out[:num_single] = absorbed_attention(q_nope[:num_single], q_rope[:num_single], entries, mask, w_uk, w_uv,
                                                  scale)
        for first, num, start, table in meta.chunks:
            end = start + num
            if start == 0:  # the chunk's own rows are its whole context (as the cache holds them)
                context = rows[first : first + num].to(layer.dtype).to(q_nope.dtype)
            else:
                context = self._blocks(layer_idx).index_select(0, table).view(-1, rows.shape[1])[:end].to(q_nope.dtype)
            part = slice(first, first + num)
            out[part] = expanded_attention(q_nope[part], q_rope[part], context[:, : self.rank], context[:, self.rank :],
                                           attn, start, scale, meta.num_threads)
        return out

