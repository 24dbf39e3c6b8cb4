"""A CPU model's weights in one block of memory that Linux backs with huge pages.

A decode step streams every weight once; with 4 KiB pages that is ~140,000
page-table lookups per token for a 125M fp32 model, and the TLB misses show:
the same weights read from 2 MiB pages decoded 64.5 -> 69 tok/s on the 2-core
AMD EPYC dev box (`benchmarks/decode_cpu.py`'s model; AnonHugePages went from
0 to 557 MB). torch's CPU allocator never asks for huge pages; numpy does for
large arrays (madvise(MADV_HUGEPAGE), where transparent huge pages are in
"madvise" or "always" mode), so the arena is one numpy allocation and every
parameter becomes a view into it. Where the kernel offers no huge pages this
costs nothing: the arena is ordinary memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ALIGN_BYTES = 64  # every tensor starts on a cache line (the C kernels' vector loads)


def place_weights_in_arena(model: nn.Module, keep_values: bool = False) -> int:
    """Re-home every CPU parameter of `model` into one arena. Values are kept only when
    asked (the loader calls this before loading). Tied parameters stay tied. Returns the
    arena's bytes. Calling it again with keep_values=True after modules were replaced
    (quantization) lets the old arena go: no parameter views it any more."""
    params = [p for p in model.parameters() if p.device.type == "cpu"]  # shared ones appear once
    sizes = [p.numel() * p.element_size() for p in params]
    total = sum(-(-size // ALIGN_BYTES) * ALIGN_BYTES for size in sizes)
    if total == 0:
        return 0
    arena = torch.from_numpy(np.empty(total + ALIGN_BYTES, dtype=np.uint8))
    offset = -arena.data_ptr() % ALIGN_BYTES
    with torch.no_grad():
        for param, size in zip(params, sizes):
            slot = arena[offset : offset + size].view(param.dtype).view(param.shape)
            if keep_values:
                slot.copy_(param.data)
            param.data = slot
            offset += -(-size // ALIGN_BYTES) * ALIGN_BYTES
    return total
