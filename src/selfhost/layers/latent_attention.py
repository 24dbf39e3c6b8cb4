"""Multi-head latent attention (DeepSeek V2/V3): keys and values from one small latent per token.

Each token is compressed to a latent c (kv_lora_rank numbers, after its RMSNorm) and one rope
key k_r (qk_rope_head_dim numbers) that every head shares. Head h's key is [W_UK[h] c, k_r] and
its value W_UV[h] c, where kv_b_proj holds W_UK and W_UV for all heads. A cache therefore keeps
only (c, k_r) per token and layer (`LatentKVStore`, engine/latent_cache.py), and attention comes
in two algebraically equal forms:
- expanded (prompts): rebuild every head's keys and values from the latents, then ordinary
  attention. Cheap when many queries share the same keys.
- absorbed (decode): fold W_UK into the query, q_lat[h] = W_UK[h]^T q_nope[h], so a score is
  q_lat[h] . c + q_rope[h] . k_r; the softmax-weighted sum of latents goes through W_UV[h] once
  per head. Decode then reads the cache's (c, k_r) rows in place of full keys and values: it is
  multi-query attention over kv_lora_rank + qk_rope_head_dim wide entries, never re-expanded.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from selfhost.layers.attention import attend_one_sequence
from selfhost.layers.linear import Linear
from selfhost.layers.norm import RMSNorm
from selfhost.layers.rotary import apply_rotary

# The q/kv low-rank norms are built with the reference's default eps, not the config's rms_norm_eps.
LORA_NORM_EPS = 1e-6


class LatentKVStore(Protocol):
    def attend_latent(
        self,
        layer_idx: int,
        q_nope: torch.Tensor,  # (T, H, qk_nope_head_dim)
        q_rope: torch.Tensor,  # (T, H, qk_rope_head_dim), rotated
        latent: torch.Tensor,  # (T, kv_lora_rank), normalised
        k_rope: torch.Tensor,  # (T, qk_rope_head_dim), rotated
        attn: LatentAttention,  # its up-projection: expand() and absorbed_weights()
        scale: float,
    ) -> torch.Tensor:  # (T, H, v_head_dim)
        ...


def absorbed_attention(
    q_nope: torch.Tensor,  # (S, H, nope): one query per sequence
    q_rope: torch.Tensor,  # (S, H, rope)
    entries: torch.Tensor,  # (S, L, rank + rope): each sequence's cached [latent | rope key] rows, padded to L
    mask: torch.Tensor,  # (S, 1, L) fp32, additive (0 visible, -inf hidden)
    w_uk: torch.Tensor,  # (H, nope, rank)
    w_uv: torch.Tensor,  # (H, v, rank)
    scale: float,
) -> torch.Tensor:  # (S, H, v)
    rank = w_uk.shape[2]
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # (S, H, rank): W_UK folded into q
    queries = torch.cat([q_lat, q_rope], dim=-1)  # (S, H, rank + rope), against the entries as keys
    scores = torch.baddbmm(mask.to(queries.dtype), queries, entries.transpose(1, 2), alpha=scale)  # (S, H, L)
    probs = scores.float().softmax(dim=-1).to(entries.dtype)
    out_lat = torch.bmm(probs, entries[..., :rank])  # (S, H, rank): the latents are the values
    return torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # (S, H, v)


def expanded_attention(
    q_nope: torch.Tensor,  # (T, H, nope): one sequence's queries at positions q_start..
    q_rope: torch.Tensor,  # (T, H, rope)
    latent: torch.Tensor,  # (L, rank): its latents at positions 0..L-1
    k_rope: torch.Tensor,  # (L, rope)
    attn: LatentAttention,
    q_start: int,
    scale: float,
    num_threads: int = 1,
) -> torch.Tensor:  # (T, H, v)
    k_nope, values = attn.expand(latent, num_threads)  # (L, H, nope), (L, H, v)
    num_keys, num_heads, _ = k_nope.shape
    keys = torch.cat([k_nope, k_rope.unsqueeze(1).expand(num_keys, num_heads, k_rope.shape[-1])], dim=-1)
    queries = torch.cat([q_nope, q_rope], dim=-1)
    return attend_one_sequence(queries, keys.transpose(0, 1), values.transpose(0, 1), q_start, scale, None, None)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs stored interleaved (x0, y0, x1, y1, ...) as halves (x0, x1, ..., y0, y1, ...).

    Queries and keys get the same permutation, so their dot products are unchanged, and the
    ordinary rotate-half rotary applies."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class LatentAttention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
        bias: bool,
        rope_interleave: bool,
    ):
        super().__init__()
        self.layer_idx, self.num_heads, self.scale = layer_idx, num_heads, scale
        self.kv_lora_rank, self.rope_interleave = kv_lora_rank, rope_interleave
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        q_size = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = Linear(hidden_size, q_size, bias=False)
        else:  # queries through their own low-rank bottleneck (DeepSeek V2, V3)
            self.q_a_proj = Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(q_lora_rank, q_size, bias=False)
        self.q_lora = q_lora_rank is not None
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LatentKVStore, num_threads: int = 1
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.q_lora:
            q = self.q_b_proj.forward(self.q_a_layernorm.forward(self.q_a_proj.forward(x, num_threads)), num_threads)
        else:
            q = self.q_proj.forward(x, num_threads)
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]
        compressed = self.kv_a_proj_with_mqa.forward(x, num_threads)  # (T, rank + rope)
        latent = self.kv_a_layernorm.forward(compressed[:, : self.kv_lora_rank].contiguous())
        k_rope = compressed[:, None, self.kv_lora_rank :]  # (T, 1, rope): one rope key for all heads
        if self.rope_interleave:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope = apply_rotary(k_rope, cos, sin)[:, 0]
        out = kv.attend_latent(self.layer_idx, q_nope, q_rope, latent, k_rope, self, self.scale)  # (T, H, v)
        return self.o_proj.forward(out.reshape(num_tokens, self.num_heads * self.v_dim), num_threads)

    def expand(self, latent: torch.Tensor, num_threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, rank) latents -> every head's no-rope keys (L, H, nope) and values (L, H, v)."""
        kv = self.kv_b_proj.forward(latent, num_threads).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        return kv[..., : self.nope_dim], kv[..., self.nope_dim :]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as per-head matrices: W_UK (H, nope, rank) and W_UV (H, v, rank).

        Views of the weight when it is a plain Linear's (the loaded weight stays the only copy);
        otherwise (bf16 weights, int8/int4) read back once through the module's own product with
        the identity, and kept."""
        kv_b = self.kv_b_proj
        if type(kv_b) is Linear:
            weight = kv_b.weight
        elif self._absorbed is not None:
            return self._absorbed
        else:
            dtype = self.kv_a_layernorm.weight.dtype  # the activations'
            eye = torch.eye(self.kv_lora_rank, dtype=dtype, device=self.kv_a_layernorm.weight.device)
            with torch.inference_mode():
                weight = kv_b.forward(eye).T.contiguous()  # (H * (nope + v), rank)
        per_head = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        absorbed = (per_head[:, : self.nope_dim], per_head[:, self.nope_dim :])
        if type(kv_b) is not Linear:
            self._absorbed = absorbed
        return absorbed
