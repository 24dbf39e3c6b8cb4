"""`--device local`: describe the machine selfhost runs on by measuring it briefly.

Memory comes from the OS; bandwidth from timing large numpy copies (a copy reads
and writes every byte, so it moves twice the array size); compute from a short
fp32 matmul. A CUDA GPU, when torch sees one, is measured the same way on the GPU.
Takes about a second.
"""

from __future__ import annotations

import os
import time

import numpy as np

from selfhost.catalog import DeviceSpec

_COPY_BYTES = 256 * 2**20
_REPEATS = 5


def _best_seconds(run, repeats: int = _REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_copy_bandwidth_gb_s(n_bytes: int = _COPY_BYTES) -> float:
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    seconds = _best_seconds(lambda: np.copyto(dst, src))
    return 2 * n_bytes / seconds / 1e9


def measure_matmul_tflops(size: int = 1024) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    seconds = _best_seconds(lambda: a @ a, repeats=3)
    return 2 * size**3 / seconds / 1e12


def system_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _cuda_device() -> DeviceSpec | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    x = torch.empty(_COPY_BYTES // 2, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)
        torch.cuda.synchronize()

    copy()
    bandwidth = 2 * _COPY_BYTES / _best_seconds(copy) / 1e9
    a = torch.randn(4096, 4096, dtype=torch.float16, device="cuda")

    def matmul():
        a @ a
        torch.cuda.synchronize()

    matmul()
    fp16_tflops = 2 * 4096**3 / _best_seconds(matmul) / 1e12
    free, total = torch.cuda.mem_get_info()
    # Measured peaks are what the planner's efficiency factors would otherwise discount.
    return DeviceSpec(
        id="local", name=f"this machine: {props.name}", kind="gpu", memory_gb=total / 1e9,
        reserved_gb=(total - free) / 1e9, bandwidth_gb_s=bandwidth, peak_fp16_tflops=fp16_tflops,
        peak_int8_tops=2 * fp16_tflops, peak_fp32_tflops=fp16_tflops / 2,
        bandwidth_efficiency=1.0, compute_efficiency=1.0, sources=("measured",),
        notes="int8 and fp32 peaks are guesses from the measured fp16 matmul.",
    )


def measure_local_device(use_gpu: bool = True) -> DeviceSpec:
    """A DeviceSpec for this machine: its GPU when one is usable, else its CPU and RAM."""
    if use_gpu:
        gpu = _cuda_device()
        if gpu is not None:
            return gpu
    memory_gb = system_memory_gb()
    fp32 = measure_matmul_tflops()
    return DeviceSpec(
        id="local", name=f"this machine: {os.cpu_count()} CPU threads", kind="cpu", memory_gb=memory_gb,
        reserved_gb=min(2.0, memory_gb * 0.2), bandwidth_gb_s=measure_copy_bandwidth_gb_s(),
        peak_fp16_tflops=fp32, peak_int8_tops=fp32, peak_fp32_tflops=fp32,
        bandwidth_efficiency=1.0, compute_efficiency=1.0, sources=("measured",),
        notes="Measured with one process; other load on the machine lowers the numbers.",
    )
