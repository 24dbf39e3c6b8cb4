"""int4 weights: group-wise scales and zero points, two values per byte.

Storage (what a checkpoint holds), for an (out, in) weight and group size g:
  qweight uint8 (out, in // 2)   low nibble = even column, high nibble = odd column
  scales  fp16  (out, in // g)
  zeros   uint8 (out, in // g)   integer zero point in [0, 15]
  weight[r, c] ~= (q[r, c] - zeros[r, c // g]) * scales[r, c // g]

Kernels (chosen once, in `prepare`):
- "int4pack_cpu": PyTorch's `aten._weight_int4pack_mm_for_cpu` on bf16
  activations (its fp32 entry point was ~30x slower here). It wants
  w = (q - 8) * scale + offset, so the zero point becomes offset = (8 - z) * scale.
- "dequant": anywhere else (CUDA, older PyTorch): dequantize the weight to the
  activation dtype, then one matmul. Correct everywhere; memory stays 4-bit
  between calls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

INT4_KERNELS = ("int4pack_cpu", "dequant")
_INNER_K_TILES = 8  # layout parameter of the int4pack kernel


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint8 (out, in/2), fp16 scales and uint8 zeros (out, in/group_size)."""
    out_features, in_features = weight.shape
    assert in_features % group_size == 0 and group_size % 2 == 0, (in_features, group_size)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    if symmetric:
        scales = w.abs().amax(dim=-1).clamp(min=1e-8) / 7.0
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
        scales = ((hi - lo) / 15.0).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    scales = scales.half().float()  # quantize against the scale that will be stored
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out_features, in_features)), scales.half(), zeros.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], (out, in) -> (out, in/2) two per byte."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) -> uint8 (out, in)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight)
    out_features, in_features = q.shape
    q = q.reshape(out_features, in_features // group_size, group_size).to(dtype)  # (out, groups, g)
    w = (q - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_features, in_features)


@functools.cache
def int4pack_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def default_int4_kernel(device: torch.device, out_features: int, group_size: int) -> str:
    # The int4pack kernel's own limits: rows in tiles of 16, a few group sizes.
    fits = out_features % 16 == 0 and group_size in (32, 64, 128, 256)
    return "int4pack_cpu" if device.type == "cpu" and fits and int4pack_cpu_available() else "dequant"


class Int4Linear(nn.Module):
    """Group-wise int4 weight-only linear layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device=None,
                 dtype=torch.float32):
        super().__init__()
        assert in_features % group_size == 0, (in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.kernel: str | None = None
        self._packed: torch.Tensor | None = None
        self._scales_and_offsets: torch.Tensor | None = None
        self._storage_bytes = 0

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, symmetric: bool) -> Int4Linear:
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype)
        q, scales, zeros = quantize_int4(w, group_size, symmetric)
        module.qweight, module.scales, module.zeros = q.to(w.device), scales.to(w.device), zeros.to(w.device)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def prepare(self, kernel: str | None = None) -> None:
        """Turn the stored weights into the kernel's layout; once, after loading."""
        kernel = kernel or default_int4_kernel(self.qweight.device, self.out_features, self.group_size)
        assert kernel in INT4_KERNELS, kernel
        self._storage_bytes = sum(t.numel() * t.element_size() for t in
                                  (self.qweight, self.scales, self.zeros, self.bias) if t is not None)
        if kernel == "int4pack_cpu":
            q = unpack_int4(self.qweight).to(torch.int32)
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
            scales = self.scales.float()
            offsets = (8.0 - self.zeros.float()) * scales
            # (groups, out, 2): the kernel's scale-and-offset layout
            self._scales_and_offsets = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous().bfloat16()
            self.qweight = self.scales = self.zeros = None
        self.kernel = kernel

    @property
    def storage_bytes(self) -> int:
        """Bytes of the quantized format: packed weight, scales, zero points, bias."""
        return self._storage_bytes

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        # num_threads is Linear's signature; torch's int4 kernel runs on torch's own threads.
        shape = x.shape
        if self._packed is not None:
            x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, self._scales_and_offsets)
            out = out.view(*shape[:-1], self.out_features).to(x.dtype)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        w = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


class Int4Embedding(nn.Module):
    """Token embeddings stored as group-wise int4; looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, device=None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = embedding_dim // group_size
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(num_embeddings, groups, dtype=torch.uint8, device=device))
        self.out_dtype = dtype

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int, symmetric: bool) -> Int4Embedding:
        w = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group_size, w.device, w.dtype)
        module.qweight, module.scales, module.zeros = quantize_int4(w, group_size, symmetric)
        return module

    def prepare(self, kernel: str | None = None) -> None:
        pass

    @property
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_int4(self.qweight[flat], self.scales[flat], self.zeros[flat], self.group_size, self.out_dtype)
        return rows.view(*ids.shape, self.embedding_dim)
