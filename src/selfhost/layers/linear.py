"""Linear layers whose CPU inference matmul runs on the fastest BLAS at hand.

PyTorch's CPU wheels multiply with MKL, which takes slow generic code paths
on AMD processors: a single-token decode step reads every weight once and
MKL's matrix-vector product reaches about 16 GB/s on this class of machine,
where numpy's bundled OpenBLAS reaches about 39 GB/s (benchmarks/decode_cpu.py
shows the end-to-end effect). numpy arrays share the tensors' memory, so the
detour costs no copy. Training (autograd), other dtypes and GPUs use F.linear.

Thread count per call: a multi-threaded OpenBLAS matrix-vector product
collapses (40x slower, measured) as soon as another process wants a core,
because its workers spin-wait between calls. Few-row products (decode steps)
therefore run on one BLAS thread, which alone nearly saturates memory
bandwidth; large products (prompt chunks, big batches) use every thread.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# SELFHOST_CPU_BLAS=torch turns the detour off (to compare, or on a CPU where MKL wins).
USE_NUMPY_BLAS = os.environ.get("SELFHOST_CPU_BLAS", "numpy") == "numpy"
# Below this many rows a product is memory-bound: one thread is as fast and never collapses.
MULTITHREAD_MIN_ROWS = int(os.environ.get("SELFHOST_BLAS_MULTITHREAD_ROWS", "32"))


class _BlasThreads:
    """Sets numpy's BLAS thread count through its C entry point, only when it changes."""

    def __init__(self):
        from threadpoolctl import ThreadpoolController

        controllers = ThreadpoolController().select(user_api="blas").lib_controllers
        self._setters = [c.set_num_threads for c in controllers]
        self.max_threads = max(1, torch.get_num_threads())
        self._current: int | None = None

    def use(self, num_threads: int) -> None:
        if num_threads != self._current:
            for set_threads in self._setters:
                set_threads(num_threads)
            self._current = num_threads


_blas_threads: _BlasThreads | None = None


def configure_cpu_blas() -> None:
    """Find numpy's BLAS once (at model load), before the first matmul needs it."""
    global _blas_threads
    if USE_NUMPY_BLAS and _blas_threads is None:
        _blas_threads = _BlasThreads()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _blas_threads is not None
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
        ):
            rows = x.shape[0] if x.dim() == 2 else x.numel() // x.shape[-1]
            _blas_threads.use(1 if rows < MULTITHREAD_MIN_ROWS else _blas_threads.max_threads)
            out = torch.from_numpy(np.matmul(x.numpy(), self.weight.detach().numpy().T))
            return out if self.bias is None else out.add_(self.bias)
        return F.linear(x, self.weight, self.bias)
