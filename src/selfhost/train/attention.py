"""The KV store training passes to the model: no cache, one causal SDPA call.

The decoder's forward is flat, (T,) tokens, because the engine packs
sequences of different lengths. A training batch is B sequences of the same
length, flattened to B*T tokens; this store folds them back into a batch so
attention never crosses from one sequence into the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfhost.layers.attention import causal_mask


class BatchCausalAttention:
    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,  # (B*T, H, D)
        k: torch.Tensor,  # (B*T, Hkv, D)
        v: torch.Tensor,  # (B*T, Hkv, D)
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # (B*T, H, D)
        if softcap is not None:
            raise NotImplementedError("training with attention soft-capping (Gemma 2) is not supported")
        B, T = self.batch_size, self.seq_len
        assert q.shape[0] == B * T, (q.shape, B, T)
        qb, kb, vb = (x.view(B, T, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        mask = None if sliding_window is None else causal_mask(0, T, T, sliding_window, q.device)
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).reshape(B * T, q.shape[1], q.shape[2])
