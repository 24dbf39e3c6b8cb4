"""Linear layers whose CPU inference matmul runs on the fastest BLAS at hand.

PyTorch's CPU wheels multiply with MKL, which takes slow generic code paths
on AMD processors: a single-token decode step reads every weight once and
MKL's matrix-vector product reaches about 16 GB/s on this class of machine,
where numpy's bundled OpenBLAS reaches about 39 GB/s (benchmarks/decode_cpu.py
shows the end-to-end effect). numpy arrays share the tensors' memory, so the
detour costs no copy. Training (autograd), other dtypes and GPUs use F.linear.

How many threads the BLAS uses is decided per engine step (`cpu_threads.py`),
not here: a product only runs on whatever count the step set.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# SELFHOST_CPU_BLAS=torch turns the detour off (to compare, or on a CPU where MKL wins).
USE_NUMPY_BLAS = os.environ.get("SELFHOST_CPU_BLAS", "numpy") == "numpy"


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if USE_NUMPY_BLAS and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            out = torch.from_numpy(np.matmul(x.numpy(), self.weight.detach().numpy().T))
            return out if self.bias is None else out.add_(self.bias)
        return F.linear(x, self.weight, self.bias)
