"""MXFP4 (OCP microscaling FP4), the format OpenAI's gpt-oss checkpoints store expert weights in.

Each run of 32 consecutive weights along a row shares one scale, an E8M0 byte (2 ** (byte - 127));
each weight is a 4-bit E2M1 float, two to a byte, the low nibble first. On disk a weight matrix
(rows, cols) is `blocks` (rows, cols / 32, 16) uint8 and `scales` (rows, cols / 32) uint8, with any
leading dims (experts) in front of both.
"""

from __future__ import annotations

import torch

from selfhost.errors import UnsupportedModelError

# The 16 E2M1 values by code: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., G, 16) uint8 codes and (..., G) uint8 exponents -> (..., G * 32) weights in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise UnsupportedModelError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair "
                         "(expected (..., G, 16) and (..., G))")
    codes = blocks.to(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1)  # (..., G, 16, 2)
    values = values.flatten(-2)  # (..., G, 32): low nibble, then high, byte by byte
    exponents = scales.to(torch.int32) - SCALE_BIAS
    return torch.ldexp(values, exponents.unsqueeze(-1)).flatten(-2).to(dtype)
