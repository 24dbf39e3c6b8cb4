"""Zero-filled CPU tensors whose pages the OS supplies on first touch.

`torch.zeros` on CPU allocates, then writes every byte: a default KV cache of a few GiB took
~14 s of a 125M model's 18 s load on a 2-core VM (2026-12-07), and held all of it resident before
any request came. numpy's zeros calls calloc, which for large sizes maps fresh pages that the
kernel guarantees to read as zero and only backs with memory when written, so loading costs
nothing and a cache fills memory as sequences fill it. The tensor views numpy's buffer (which
it keeps alive), aligned to 64 bytes as the AVX-512 kernels' loads and torch's own allocator have it.
"""

from __future__ import annotations

import numpy as np
import torch

ALIGNMENT = 64


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device); on the CPU without touching the memory."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return torch.from_numpy(raw[offset : offset + nbytes]).view(dtype).view(shape)
