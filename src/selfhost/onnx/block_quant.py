"""Weights of a linear layer as ONNX Runtime's `MatMulNBits` (4 or 8-bit blocks).

MatMulNBits (com.microsoft) holds W (N outputs x K inputs) as blocks of
`block_size` consecutive inputs per output row, each block with its own fp
scale and uint8 zero point: w = (q - zero_point) * scale. 4-bit values pack two
to a byte, low nibble first, and so do their zero points. Rounding is plain
round-to-nearest (RTN), the asymmetric variant: each block spans [min, max] of
its weights (widened to include 0, so zero stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 32  # what ONNX Runtime GenAI's own CPU int4 exports use
# accuracy_level 4: the kernel quantizes activations to int8 per block and multiplies in
# integers (ONNX Runtime's fastest CPU path for MatMulNBits; "acc-level-4" in its exports).
ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class BlockQuantized:
    """MatMulNBits inputs and attributes for one weight."""

    packed: np.ndarray  # uint8 (N, num_blocks, block_size * bits / 8)
    scales: np.ndarray  # float (N * num_blocks,)
    zero_points: np.ndarray  # uint8, (N * ceil(num_blocks / 2),) at 4 bits, (N * num_blocks,) at 8
    in_features: int  # K
    out_features: int  # N
    bits: int
    block_size: int


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two to a byte (low nibble first); odd lengths padded with 0."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantize_blocks(weight: np.ndarray, bits: int, scale_dtype: np.dtype, block_size: int = BLOCK_SIZE) -> BlockQuantized:
    """weight: (N, K) fp32, as nn.Linear stores it."""
    assert bits in (4, 8), bits
    out_features, in_features = weight.shape
    num_blocks = -(-in_features // block_size)
    padded = np.zeros((out_features, num_blocks * block_size), np.float32)
    padded[:, :in_features] = weight
    blocks = padded.reshape(out_features, num_blocks, block_size)  # (N, blocks, block_size)
    qmax = 2**bits - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype).astype(np.float32)  # all-zero block: any scale
    zero_point = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)  # (N, blocks)
    q = np.clip(np.round(blocks / scale[..., None]) + zero_point[..., None], 0, qmax).astype(np.uint8)
    if bits == 4:
        packed, zero_points = _pack_nibbles(q), _pack_nibbles(zero_point)
    else:
        packed, zero_points = q, zero_point
    return BlockQuantized(
        packed=np.ascontiguousarray(packed),
        scales=scale.astype(scale_dtype).reshape(-1),
        zero_points=zero_points.reshape(-1),
        in_features=in_features,
        out_features=out_features,
        bits=bits,
        block_size=block_size,
    )


def dequantize_blocks(q: BlockQuantized) -> np.ndarray:
    """(N, K) fp32: what MatMulNBits multiplies by (for tests and error estimates)."""
    if q.bits == 4:
        low, high = q.packed & 0x0F, q.packed >> 4
        values = np.stack([low, high], axis=-1).reshape(q.out_features, -1, q.block_size)
        zp = np.stack([q.zero_points.reshape(q.out_features, -1) & 0x0F,
                       q.zero_points.reshape(q.out_features, -1) >> 4], axis=-1).reshape(q.out_features, -1)
    else:
        values, zp = q.packed, q.zero_points.reshape(q.out_features, -1)
    num_blocks = values.shape[1]
    zp = zp[:, :num_blocks]
    scales = q.scales.astype(np.float32).reshape(q.out_features, num_blocks)
    w = (values.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(q.out_features, -1)[:, : q.in_features]
