"""Linear layers whose CPU inference matmul runs on the fastest kernel at hand.

PyTorch's CPU wheels multiply with MKL, which takes slow generic code paths on
AMD processors: a single-token decode step reads every weight once and MKL's
matrix-vector product reaches about 16 GB/s on this class of machine. So fp32
inference on CPU goes elsewhere, without copying any weight:
- on CPUs with AVX-512: selfhost's `_gemm_cpu.c` (dot products on weights read
  in place up to a few hundred rows, packed panels beyond), up to the row count
  from which torch's MKL product was measured faster on this CPU (from 128 rows
  on a Xeon; models/fp32_products.py), every product where it never is (as
  expected on AMD, where MKL takes generic paths).
  On a 2-core AMD EPYC it streams a decode step's weights at ~38 GB/s, runs
  a 32-row batch step 1.5x faster than OpenBLAS and prompt chunks 1.6x faster
  than the OpenBLAS AVX2 kernels this machine's environment pins;
- otherwise, up to 31 rows (decode steps): `_matvec_cpu.c` (AVX2, prefetching,
  ~25 GB/s on one thread);
- more rows (prompts, big batches), or where no extension was compiled:
  numpy's bundled OpenBLAS, compute-bound and efficient there.
All of selfhost's kernels run on the process's one worker pool, which never
waits for a descheduled thread (../_cpu_pool.c).
Training (autograd), other dtypes and GPUs use F.linear.

How many threads a product uses is the caller's argument: the engine decides it
per step (engine/cpu_threads.py) and passes it down through the model's forward.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    from selfhost.layers import _matvec_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _matvec_cpu = None
try:
    from selfhost.layers import _gemm_cpu
except ImportError:
    _gemm_cpu = None

# SELFHOST_CPU_BLAS=torch turns the detour off (to compare, or on a CPU where MKL wins);
# SELFHOST_CPU_BLAS=numpy uses OpenBLAS for every product.
CPU_BLAS = os.environ.get("SELFHOST_CPU_BLAS", "auto")
USE_GEMM = CPU_BLAS == "auto" and _gemm_cpu is not None and _gemm_cpu.available()
USE_MATVEC = CPU_BLAS == "auto" and not USE_GEMM and _matvec_cpu is not None and _matvec_cpu.available()
# The AVX2 few-row product beats OpenBLAS up to this many rows (decode-sized steps).
MATVEC_MAX_ROWS = 31


class Linear(nn.Linear):
    # From this many rows torch's product (MKL) takes over from selfhost's GEMM: measured per CPU
    # at load (models/fp32_products.py), where MKL is tuned to the core; never by default.
    blas_from_rows: int = sys.maxsize

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """x @ W^T + b; num_threads: threads selfhost's CPU kernels may use for this product."""
        if CPU_BLAS == "torch" or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        # Parameters straight from the dict: nn.Module.__getattr__ costs ~1 us a lookup on the decode path.
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        rows = x.numel() // self.in_features
        if USE_GEMM and rows >= self.blas_from_rows:
            return F.linear(x, weight, bias)
        if (USE_GEMM or (USE_MATVEC and rows <= MATVEC_MAX_ROWS)) and weight.is_contiguous():
            x = x.contiguous()
            out = torch.empty(*x.shape[:-1], self.out_features)
            product = _gemm_cpu.gemm if USE_GEMM else _matvec_cpu.matvec
            product(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, self.out_features, self.in_features,
                    num_threads)
        else:
            out = torch.from_numpy(np.matmul(x.numpy(), weight.detach().numpy().T))
        return out if bias is None else out.add_(bias)
