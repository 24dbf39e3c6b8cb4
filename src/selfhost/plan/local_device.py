"""`--device local`: describe the machine selfhost runs on by measuring it briefly.

Memory comes from the OS; bandwidth from timing large numpy copies (a copy reads
and writes every byte, so it moves twice the array size); compute from a short
fp32 matmul. A CUDA GPU, when torch sees one, is measured the same way on the GPU.

On a CPU the decode kernels themselves are timed too, with the threads selfhost
gives them: the fp32 matrix-vector product through numpy's OpenBLAS (selfhost's
Linear) on one thread, and selfhost's Int8Linear on its default CPU kernel. Their
bytes/s over the copy bandwidth are the device's bandwidth efficiencies. Takes a
few seconds.
"""

from __future__ import annotations

import os
import time

import numpy as np

from selfhost.catalog import DeviceSpec

_COPY_BYTES = 256 * 2**20
_REPEATS = 5
_GEMV_BYTES = 64 * 2**20  # several times any CPU's last-level cache


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


# Decode kernels are timed on a stack of layer-shaped matrices (rows x 1024 inputs,
# like a small model's projections; a 4096-wide matrix streams ~10% faster) held in
# memory torch allocated, as selfhost's weights are: numpy asks the kernel for huge
# pages on large arrays and torch does not, which alone is ~13% faster here.
_GEMV_SHAPE = (3072, 1024)


def measure_fp32_gemv_gb_s(n_bytes: int = _GEMV_BYTES) -> float:
    """Weight bytes/s of one-row fp32 products through numpy's BLAS (selfhost's Linear)
    on one thread: the count selfhost's decode steps start from and keep whenever
    another process wants a core (layers/cpu_threads.py); on an idle machine they
    may find two threads faster, and then decode beats this estimate."""
    import torch
    from threadpoolctl import threadpool_limits

    rows, cols = _GEMV_SHAPE
    weights = [torch.ones(rows, cols).numpy() for _ in range(max(1, n_bytes // (rows * cols * 4)))]
    x = np.ones((1, cols), dtype=np.float32)

    def stream():
        for weight in weights:
            np.matmul(x, weight.T)

    with threadpool_limits(1, user_api="blas"):
        seconds = _best_seconds(stream)
    return sum(w.nbytes for w in weights) / seconds / 1e9


def measure_int8_gemv_gb_s(n_bytes: int = _GEMV_BYTES) -> float | None:
    """Weight bytes/s of one-row products through selfhost's int8 linear layer on its
    default CPU kernel (one thread for a row); None without a CPU int8 kernel."""
    import torch

    from selfhost.quant.int8 import Int8Linear, default_int8_kernel

    if default_int8_kernel(torch.device("cpu")) == "dequant":
        return None
    rows, cols = _GEMV_SHAPE
    layers = []
    with torch.no_grad():
        for _ in range(max(1, n_bytes // (rows * cols))):
            layer = Int8Linear(cols, rows, bias=False)
            layer.qweight = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
            layer.scales = torch.full((rows,), 1e-3)
            layer.prepare()
            layers.append(layer)
        x = torch.ones(1, cols)

        def stream():
            for layer in layers:
                layer(x)

        stream()
        seconds = _best_seconds(stream)
    return len(layers) * rows * cols / seconds / 1e9


def measure_matmul_tflops(size: int = 1024) -> float:
    """fp32 matmul FLOP/s on one BLAS thread or all, whichever is faster now: with
    another process on a core, all-thread OpenBLAS can collapse to a fraction of one."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for threads in sorted({1, os.cpu_count() or 1}):
        with threadpool_limits(threads, user_api="blas"):
            best = min(best, _best_seconds(lambda: a @ a, repeats=3))
    return 2 * size**3 / best / 1e12


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
    copy, gemv, int8_gemv = measure_copy_bandwidth_gb_s(), measure_fp32_gemv_gb_s(), measure_int8_gemv_gb_s()
    return local_cpu_device(copy, gemv, int8_gemv, measure_matmul_tflops())


def local_cpu_device(copy_gb_s: float, fp32_gemv_gb_s: float, int8_gemv_gb_s: float | None,
                     fp32_tflops: float) -> DeviceSpec:
    """The DeviceSpec of this machine's CPU from its measured rates."""
    memory_gb = system_memory_gb()
    # A read-only stream can beat a copy; then the kernel's own rate is the bandwidth.
    bandwidth = max(copy_gb_s, fp32_gemv_gb_s, int8_gemv_gb_s or 0.0)
    return DeviceSpec(
        id="local", name=f"this machine: {os.cpu_count()} CPU threads", kind="cpu", memory_gb=memory_gb,
        reserved_gb=min(2.0, memory_gb * 0.2), bandwidth_gb_s=bandwidth,
        peak_fp16_tflops=fp32_tflops, peak_int8_tops=fp32_tflops, peak_fp32_tflops=fp32_tflops,
        bandwidth_efficiency=fp32_gemv_gb_s / bandwidth, compute_efficiency=1.0,
        int8_bandwidth_efficiency=int8_gemv_gb_s / bandwidth if int8_gemv_gb_s else None, sources=("measured",),
        notes=f"Measured with one process: copy {copy_gb_s:.1f} GB/s, fp32 decode kernel {fp32_gemv_gb_s:.1f} GB/s, "
              f"int8 decode kernel {int8_gemv_gb_s or 0:.1f} GB/s; other load on the machine lowers the numbers.",
    )
