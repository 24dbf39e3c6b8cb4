"""FP8 block-quantized checkpoints (DeepSeek-V3/R1's own release), dequantized as they are read.

config.json says `quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}`. Each quantized `X.weight` (out, in) is stored as
float8_e4m3fn beside `X.weight_scale_inv`, float32 (ceil(out / 128), ceil(in / 128)): one scale per
128 x 128 tile, rows (output features) first. The real weight is the stored one times its tile's
scale; a weight whose size is not a multiple of 128 ends in partial tiles, which take the last scale
of their row or column of tiles (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: 4.5 tiles).
Activations are quantized on the fly by FP8 kernels ("dynamic"); loaded dequantized, there is
nothing of theirs to read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from selfhost.errors import UnsupportedModelError

FP8_METHOD = "fp8"  # quantization_config.quant_method
SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` scales `X.weight`
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}  # quantization_config.fmt -> the stored dtype
ACTIVATION_SCHEMES = ("dynamic",)

Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Fp8BlockFormat:
    """What quantization_config says: the stored dtype and the tile (rows, cols) one scale covers."""

    stored_dtype: torch.dtype
    block_rows: int
    block_cols: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8BlockFormat:
        fmt = config.get("fmt", "e4m3")
        if fmt not in FP8_FORMATS:
            raise UnsupportedModelError(
                f"quantization_config.fmt {fmt!r} is not supported; FP8 checkpoints load with fmt in {sorted(FP8_FORMATS)}"
            )
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise UnsupportedModelError(
                f"quantization_config.activation_scheme {scheme!r} is not supported; "
                f"FP8 checkpoints load with {', '.join(map(repr, ACTIVATION_SCHEMES))}"
            )
        block = config.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise UnsupportedModelError(
                f"quantization_config.weight_block_size {block!r} is not supported; FP8 checkpoints load with "
                "2-D block scales, [rows, cols] such as [128, 128] (per-tensor or per-channel FP8 is not read)"
            )
        return cls(FP8_FORMATS[fmt], block[0], block[1])

    def dequantize(self, name: str, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) stored weight and its (ceil(out / rows), ceil(in / cols)) scales -> (out, in) in `dtype`.

        One band of `block_rows` rows at a time, so the fp32 products never exceed one band
        (a whole fp32 copy of a large expert matrix would be 4x its stored size).
        """
        if weight.dtype != self.stored_dtype:
            raise UnsupportedModelError(
                f"tensor {name} is {weight.dtype}; quantization_config says FP8 weights are {self.stored_dtype}"
            )
        if weight.dim() != 2:
            raise UnsupportedModelError(f"tensor {name} has shape {tuple(weight.shape)}; FP8 block scales need a 2-D weight")
        rows, cols = weight.shape
        expected = (-(-rows // self.block_rows), -(-cols // self.block_cols))
        if tuple(scale_inv.shape) != expected:
            raise UnsupportedModelError(
                f"tensor {name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}; a {rows}x{cols} weight in "
                f"{self.block_rows}x{self.block_cols} blocks needs {expected}"
            )
        out = torch.empty(rows, cols, dtype=dtype)
        scale_inv = scale_inv.float()
        for band, start in enumerate(range(0, rows, self.block_rows)):
            stop = min(start + self.block_rows, rows)
            # (cols,): each tile's scale repeated across its columns; the last tile may be partial
            col_scales = scale_inv[band].repeat_interleave(self.block_cols)[:cols]
            out[start:stop] = weight[start:stop].float() * col_scales  # (band rows, cols)
        return out


def dequantize_fp8_tensors(tensors: Tensors, fmt: Fp8BlockFormat, dtype: torch.dtype) -> Tensors:
    """Pair each FP8 `X.weight` with its `X.weight_scale_inv` and yield `X.weight` in `dtype`; others pass.

    A weight waits for its scale (or the scale for its weight) only until the other arrives: in
    DeepSeek's shards they sit side by side, so at most one stored FP8 tensor is held at a time.
    """
    weights: dict[str, torch.Tensor] = {}  # FP8 weights still waiting for their scale
    scales: dict[str, torch.Tensor] = {}  # scales that came first, by their weight's name
    for name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            weight_name = name.removesuffix(SCALE_SUFFIX)
            weight = weights.pop(weight_name, None)
            if weight is None:
                scales[weight_name] = tensor
            else:
                yield weight_name, fmt.dequantize(weight_name, weight, tensor, dtype)
        elif tensor.dtype == fmt.stored_dtype:
            scale = scales.pop(name, None)
            if scale is None:
                weights[name] = tensor
            else:
                yield name, fmt.dequantize(name, tensor, scale, dtype)
        else:
            yield name, tensor
    if weights:
        raise UnsupportedModelError(f"FP8 tensors without a {SCALE_SUFFIX} scale: {', '.join(sorted(weights)[:5])}")
    if scales:
        raise UnsupportedModelError(
            f"{SCALE_SUFFIX} scales without their FP8 weight: {', '.join(n + SCALE_SUFFIX for n in sorted(scales)[:5])}"
        )
