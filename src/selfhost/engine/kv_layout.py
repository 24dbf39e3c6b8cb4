"""How a paged KV cache lays out one layer's keys and values, and the int8 cache's rounding.

Blocks are head-major: (kv_heads, num_blocks, ...). Keys are dims-major inside a block,
(head_dim, block_size), values are rows, (block_size, head_dim); an int8 cache keeps keys in
pairs of dimensions, (head_dim/2, block_size, 2), and values in pairs of keys,
(block_size/2, head_dim, 2): the operands of AVX512-VNNI's vpdpwssd in the C kernels. These
helpers give any of them back as rows (the torch paths, the tests), and round rows to int8
exactly as the C writer does.
"""

from __future__ import annotations

import torch

KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the C kernels' kv_kind


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> int8 (..., D) and fp32 scales (...): round(x * (127 / max|x|)) to nearest even, scale
    max|x| / 127 (0 for a row of zeros). The C writer (_weighted_rows_avx512.h's int8_quantize_row) does
    the same IEEE operations, so both write the same bytes."""
    x = x.float()
    largest = x.abs().amax(dim=-1)
    # A true division: torch computes `127.0 / largest` as reciprocal(largest) * 127, rounded twice, which
    # moved a product onto a tie (x.5) the C writer's single division does not reach, one byte apart.
    inv = torch.where(largest > 0, torch.full_like(largest, 127.0) / largest, torch.zeros_like(largest))
    q = torch.round(x * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, largest / 127.0


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows (..., D) times their scales (...), in `dtype`."""
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def value_rows(v_layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The values of `blocks` (one layer: rows, or an int8 cache's pairs of keys) as
    (Hkv, len(blocks) * block_size, D) rows."""
    picked = v_layer.index_select(1, blocks)
    if picked.dim() == 5:  # (Hkv, n, BS/2, D, 2) -> (Hkv, n, BS/2, 2, D)
        return picked.transpose(3, 4).reshape(picked.shape[0], -1, picked.shape[3])
    return picked.view(picked.shape[0], -1, picked.shape[-1])


def key_rows(k_layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The keys of `blocks` (one layer: dims-major blocks, or an int8 cache's pairs of dimensions) as
    (Hkv, len(blocks) * block_size, D) rows."""
    picked = k_layer.index_select(1, blocks)
    if picked.dim() == 5:  # (Hkv, n, D/2, BS, 2) -> (Hkv, n, BS, D/2, 2)
        return picked.transpose(2, 3).reshape(picked.shape[0], -1, picked.shape[2] * 2)
    return picked.transpose(2, 3).reshape(picked.shape[0], -1, picked.shape[2])
