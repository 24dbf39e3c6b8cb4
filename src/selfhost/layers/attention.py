"""Self-attention: projections, q/k norm and rotary here; the cache behind a seam.

`Attention.forward` never touches KV memory itself. It hands q, k, v to the
`KVStore` the engine passes in, which writes the new keys and values wherever
its memory layout keeps them (one contiguous buffer, or paged blocks) and
returns the attention output. That is the one place a paged cache plugs in.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfhost.layers.linear import Linear
from selfhost.layers.norm import RMSNorm
from selfhost.layers.rotary import apply_rotary


class KVStore(Protocol):
    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        ...


def causal_mask(q_start: int, num_queries: int, num_keys: int, sliding_window: int | None, device) -> torch.Tensor:
    """Boolean (num_queries, num_keys) mask; query i sits at position q_start + i."""
    q_pos = torch.arange(q_start, q_start + num_queries, device=device).unsqueeze(1)
    k_pos = torch.arange(num_keys, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    return allowed


def attend_one_sequence(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (Hkv, L, D): cached keys at positions 0..L-1
    v: torch.Tensor,  # (Hkv, L, D)
    q_start: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Causal (optionally windowed, soft-capped) attention of one sequence's queries over its keys."""
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads, num_keys, _ = k.shape
    needs_mask = num_queries > 1 or (sliding_window is not None and num_keys > sliding_window)
    if softcap is None:
        qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        # A whole prompt with no window in reach is plain causal: SDPA then skips the
        # blocks above the diagonal instead of masking them (~22% faster at 512 tokens).
        plain_causal = needs_mask and q_start == 0 and num_queries == num_keys and (
            sliding_window is None or sliding_window >= num_keys
        )
        masked = needs_mask and not plain_causal
        mask = causal_mask(q_start, num_queries, num_keys, sliding_window, q.device) if masked else None
        out = F.scaled_dot_product_attention(
            qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=plain_causal,
            scale=scale, enable_gqa=num_heads != num_kv_heads,
        )
        return out[0].transpose(0, 1)  # (T, H, D)
    # Soft-capping squashes the scores before softmax, which SDPA cannot do: spell it out.
    group = num_heads // num_kv_heads
    qh = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (Hkv, G, T, D)
    scores = torch.matmul(qh.reshape(num_kv_heads, group * num_queries, head_dim), k.transpose(1, 2))
    scores = scores.view(num_kv_heads, group, num_queries, num_keys).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if needs_mask:
        mask = causal_mask(q_start, num_queries, num_keys, sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(num_kv_heads, group * num_queries, num_keys), v)  # (Hkv, G*T, D)
    return out.view(num_kv_heads, group, num_queries, head_dim).permute(2, 0, 1, 3).reshape(
        num_queries, num_heads, head_dim
    )


class Attention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
        norm_weight_offset: float,
        sliding_window: int | None,
        softcap: float | None,
        sinks: bool = False,
    ):
        """sinks: a learned logit per head joins every softmax's denominator (gpt-oss); such layers
        call the store's `attend_with_sinks`."""
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # q, k and v share one matmul; checkpoints with separate weights are packed at load.
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, norm_weight_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, norm_weight_offset)
        else:
            self.q_norm = self.k_norm = None
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVStore, num_threads: int = 1
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        heads = self.qkv_proj.forward(x, num_threads).view(num_tokens, -1, self.head_dim)  # (T, H + 2*Hkv, D): q, k, v heads
        num_qk = self.num_heads + self.num_kv_heads
        if self.q_norm is not None:
            # Each q and k head normalised as one contiguous row (the norm's C kernel where it runs,
            # as the decode-step runner calls it), back in one (T, H + 2*Hkv, D) block for the rest.
            heads = torch.cat((self.q_norm.forward(heads[:, : self.num_heads].contiguous(), num_threads),
                               self.k_norm.forward(heads[:, self.num_heads : num_qk].contiguous(), num_threads),
                               heads[:, num_qk:]), dim=1)
        if self.sinks is None and (fused := getattr(kv, "rope_attend", None)) is not None:
            out = fused(self.layer_idx, heads, cos, sin, self.num_heads, self.scale, self.sliding_window, self.softcap)
            if out is not None:
                return self.o_proj.forward(out.view(num_tokens, self.q_size), num_threads)
        v = heads[:, num_qk:]
        # q and k are adjacent heads: one rotation covers both.
        qk = apply_rotary(heads[:, :num_qk], cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        if self.sinks is not None:
            out = kv.attend_with_sinks(self.layer_idx, q, k, v, self.sinks, self.scale, self.sliding_window)
        else:
            out = kv.attend(self.layer_idx, q, k, v, self.scale, self.sliding_window, self.softcap)
        return self.o_proj.forward(out.reshape(num_tokens, self.q_size), num_threads)
