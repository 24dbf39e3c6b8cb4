"""Attention with sinks (gpt-oss): each head has a learned logit that joins the softmax's denominator.

softmax over [scores, sink], then the sink's share dropped: a head can put weight on "nothing"
instead of being forced to spread all of it over the keys. No value belongs to the sink, so the
output is the ordinary attention output times sum(e^s) / (sum(e^s) + e^sink). Torch ops only:
the C kernels do not know about sinks.
"""

from __future__ import annotations

import torch

from selfhost.layers.attention import causal_mask


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """scores (..., L) fp32 (masked keys at -inf), sink broadcastable to (..., 1) -> probabilities over the L keys."""
    peak = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    weights = (scores - peak).exp()
    return weights / (weights.sum(dim=-1, keepdim=True) + (sink - peak).exp())


def attend_one_sequence_with_sinks(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (Hkv, L, D): keys at positions 0..L-1
    v: torch.Tensor,  # (Hkv, L, D)
    q_start: int,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor,  # (H,)
) -> torch.Tensor:  # (T, H, D)
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads, num_keys, _ = k.shape
    group = num_heads // num_kv_heads
    qh = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (Hkv, G, T, D)
    scores = torch.matmul(qh.reshape(num_kv_heads, group * num_queries, head_dim), k.transpose(1, 2))
    scores = scores.view(num_kv_heads, group, num_queries, num_keys).float() * scale
    mask = causal_mask(q_start, num_queries, num_keys, sliding_window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = softmax_with_sink(scores, sinks.float().view(num_kv_heads, group, 1, 1)).to(v.dtype)
    out = torch.matmul(probs.view(num_kv_heads, group * num_queries, num_keys), v)  # (Hkv, G*T, D)
    return out.view(num_kv_heads, group, num_queries, head_dim).permute(2, 0, 1, 3).reshape(
        num_queries, num_heads, head_dim
    )


def single_queries_with_sinks(
    q: torch.Tensor,  # (S, H, D): one query per sequence
    k: torch.Tensor,  # (Hkv, S, L, D) keys gathered per sequence, padded to L
    v: torch.Tensor,  # (Hkv, S, L, D)
    mask: torch.Tensor,  # (Hkv*S, 1, L) fp32, additive
    scale: float,
    sinks: torch.Tensor,  # (H,)
) -> torch.Tensor:  # (S, H, D)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, _, max_len, _ = k.shape
    group = num_heads // num_kv_heads
    # Rows of the batched products are (kv head, sequence) pairs; the G query heads sharing a kv head are columns.
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
    scores = torch.bmm(qg, k.view(-1, max_len, head_dim).transpose(1, 2)).float() * scale + mask  # (Hkv*S, G, L)
    sink = sinks.float().view(num_kv_heads, 1, group, 1).expand(num_kv_heads, num_seqs, group, 1)
    probs = softmax_with_sink(scores, sink.reshape(-1, group, 1)).to(v.dtype)
    out = torch.bmm(probs, v.view(-1, max_len, head_dim))  # (Hkv*S, G, D)
    return out.view(num_kv_heads, num_seqs, group, head_dim).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)
