"""`--device local`: describe the machine selfhost runs on by measuring it briefly.

The measuring half of `selfhost fit --device local` (it times selfhost's own
kernels, so it imports the runtime); the planner only receives the DeviceSpec.

Memory comes from the OS; bandwidth from timing large numpy copies (a copy reads
and writes every byte, so it moves twice the array size); compute from a short
fp32 matmul. A CUDA GPU, when torch sees one, is measured the same way on the GPU.

On a CPU the engine's own kernels are timed, with the threads selfhost gives them:
the one-row fp32 product through selfhost's Linear on one thread, selfhost's
Int8Linear on its default CPU kernel, and a prompt-sized product through Linear. Their
bytes/s over the copy bandwidth are the device's bandwidth efficiencies. Takes a
few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from selfhost.catalog import DeviceSpec
from selfhost.host_memory import total_memory_bytes
from selfhost.timing import best_seconds

_COPY_BYTES = 256 * 2**20
_GEMV_BYTES = 64 * 2**20  # several times any CPU's last-level cache


def measure_copy_bandwidth_gb_s(n_bytes: int = _COPY_BYTES) -> float:
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    seconds = best_seconds(lambda: np.copyto(dst, src))
    return 2 * n_bytes / seconds / 1e9


# Decode kernels are timed on a stack of layer-shaped matrices (rows x 1024 inputs,
# like a small model's projections; a 4096-wide matrix streams ~10% faster) held in
# one weight arena, as a loaded model's fp32 weights are (models/weight_arena.py):
# huge pages where the kernel grants them, which alone streams ~5-13% faster here.
_GEMV_SHAPE = (3072, 1024)


def _linear_stack(rows: int, cols: int, count: int) -> list:
    import torch

    from selfhost.layers.linear import Linear
    from selfhost.models.weight_arena import place_weights_in_arena

    with torch.device("meta"):
        layers = [Linear(cols, rows, bias=False) for _ in range(count)]
    for layer in layers:
        layer.weight = torch.nn.Parameter(torch.empty(rows, cols), requires_grad=False)
    place_weights_in_arena(torch.nn.ModuleList(layers))
    for layer in layers:
        layer.weight.data.fill_(1.0)
    return layers


def _on_threads(threads: int, run) -> float:
    """Best time of `run(threads)`: selfhost's kernels take the count as an argument, torch's ops get it too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            run(threads)
            return best_seconds(lambda: run(threads))
    finally:
        torch.set_num_threads(before)


def _one_row_gb_s(layers: list, in_features: int, bytes_per_layer: int) -> float:
    """Weight bytes/s of one-row products through `layers` in turn, on one thread."""
    import torch

    x = torch.ones(1, in_features)

    def stream(threads: int):
        for layer in layers:
            layer.forward(x, threads)

    return len(layers) * bytes_per_layer / _on_threads(1, stream) / 1e9


def measure_fp32_gemv_gb_s(n_bytes: int = _GEMV_BYTES) -> float:
    """Weight bytes/s of one-row fp32 products through selfhost's Linear (its AVX-512 or
    AVX2 kernel, else numpy's BLAS) on one thread: the count selfhost's decode steps
    start from and keep whenever another process wants a core (engine/cpu_threads.py);
    on an idle machine they may find two threads faster, and then decode beats this."""
    rows, cols = _GEMV_SHAPE
    return _one_row_gb_s(_linear_stack(rows, cols, max(1, n_bytes // (rows * cols * 4))), cols, rows * cols * 4)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs), None where it does not."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


def measure_cached_fp32_gemv_gb_s(cache_bytes: int) -> float:
    """measure_fp32_gemv_gb_s for weights that fit in half the cache: they stay there."""
    rows, cols = _GEMV_SHAPE[0] // 4, _GEMV_SHAPE[1]
    count = max(1, cache_bytes // 2 // (rows * cols * 4))
    return _one_row_gb_s(_linear_stack(rows, cols, count), cols, rows * cols * 4)


def measure_int8_gemv_gb_s(n_bytes: int = _GEMV_BYTES) -> float | None:
    """Weight bytes/s of one-row products through selfhost's int8 linear layer on its
    default CPU kernel, on one thread; None without a CPU int8 kernel."""
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
    return _one_row_gb_s(layers, cols, rows * cols)


def _bf16_stack(rows: int, cols: int, count: int) -> list | None:
    """`count` bf16-weight layers as `weight_dtype="bfloat16"` makes them on this CPU (its
    layout, the few-row kernel for one row); None where selfhost has no bf16 CPU kernel."""
    import torch

    from selfhost.layers.bf16_linear import Bf16Linear, best_layout, c_kernel_available, tiles_available

    layout = best_layout()
    if not (tiles_available() if layout == "tiles" else c_kernel_available()):
        return None
    with torch.no_grad():
        return [Bf16Linear.from_linear(torch.nn.Linear(cols, rows, bias=False), few_rows_max=1, layout=layout)
                for _ in range(count)]


def measure_bf16_gemv_gb_s(n_bytes: int = _GEMV_BYTES) -> float | None:
    """Weight bytes/s of one-row products with bf16 weights (what `weight_dtype="auto"` picks
    where it is faster), on one thread; None without selfhost's bf16 CPU kernels."""
    rows, cols = _GEMV_SHAPE
    layers = _bf16_stack(rows, cols, max(1, n_bytes // (rows * cols * 2)))
    return None if layers is None else _one_row_gb_s(layers, cols, rows * cols * 2)


def measure_bf16_matmul_tflops(size: int = 1024) -> float | None:
    """FLOP/s of a prompt-sized product with bf16 weights (AMX tiles or oneDNN), fp32 in and
    out, on one thread or all, whichever is faster now; None without the bf16 kernels."""
    import torch

    layers = _bf16_stack(size, size, 1)
    if layers is None:
        return None
    x = torch.ones(size, size)
    best = min(_on_threads(threads, lambda t: layers[0].forward(x, t)) for threads in sorted({1, os.cpu_count() or 1}))
    return 2 * size**3 / best / 1e12


def measure_matmul_tflops(size: int = 1024) -> float:
    """fp32 FLOP/s of a prompt-sized product through selfhost's Linear, on one thread or
    all, whichever is faster now (prompt steps start on all threads and fall back to one
    when another process takes a core)."""
    import torch

    (layer,) = _linear_stack(size, size, 1)
    x = torch.ones(size, size)
    best = min(_on_threads(threads, lambda t: layer.forward(x, t)) for threads in sorted({1, os.cpu_count() or 1}))
    return 2 * size**3 / best / 1e12


def system_memory_gb() -> float:
    return total_memory_bytes() / 1e9


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
    bandwidth = 2 * _COPY_BYTES / best_seconds(copy) / 1e9
    a = torch.randn(4096, 4096, dtype=torch.float16, device="cuda")

    def matmul():
        a @ a
        torch.cuda.synchronize()

    matmul()
    fp16_tflops = 2 * 4096**3 / best_seconds(matmul) / 1e12
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
    cache_bytes = last_level_cache_bytes()
    cached_gemv = measure_cached_fp32_gemv_gb_s(cache_bytes) if cache_bytes else None
    return local_cpu_device(copy, gemv, int8_gemv, measure_matmul_tflops(), cache_bytes, cached_gemv,
                            measure_bf16_gemv_gb_s(), measure_bf16_matmul_tflops())


def local_cpu_device(copy_gb_s: float, fp32_gemv_gb_s: float, int8_gemv_gb_s: float | None,
                     fp32_tflops: float, cache_bytes: int | None = None,
                     cached_gemv_gb_s: float | None = None, bf16_gemv_gb_s: float | None = None,
                     bf16_tflops: float | None = None) -> DeviceSpec:
    """The DeviceSpec of this machine's CPU from its measured rates. Its "fp16" peak and
    16-bit bandwidth are selfhost's bf16-weight kernels' where they were measured (a CPU
    runs 16-bit weights as bf16), else the fp32 ones."""
    memory_gb = system_memory_gb()
    # A read-only stream can beat a copy; then the kernel's own rate is the bandwidth.
    bandwidth = max(copy_gb_s, fp32_gemv_gb_s, int8_gemv_gb_s or 0.0, bf16_gemv_gb_s or 0.0)
    return DeviceSpec(
        id="local", name=f"this machine: {os.cpu_count()} CPU threads", kind="cpu", memory_gb=memory_gb,
        reserved_gb=min(2.0, memory_gb * 0.2), bandwidth_gb_s=bandwidth,
        peak_fp16_tflops=bf16_tflops or fp32_tflops, peak_int8_tops=fp32_tflops, peak_fp32_tflops=fp32_tflops,
        bandwidth_efficiency=fp32_gemv_gb_s / bandwidth, compute_efficiency=1.0,
        int8_bandwidth_efficiency=int8_gemv_gb_s / bandwidth if int8_gemv_gb_s else None,
        bf16_bandwidth_efficiency=bf16_gemv_gb_s / bandwidth if bf16_gemv_gb_s else None,
        cache_bytes=cache_bytes, cache_bandwidth_gb_s=cached_gemv_gb_s, sources=("measured",),
        notes=f"Measured with one process: copy {copy_gb_s:.1f} GB/s, fp32 decode kernel {fp32_gemv_gb_s:.1f} GB/s "
              f"({cached_gemv_gb_s or 0:.1f} from a {(cache_bytes or 0) / 2**20:.0f} MiB cache), "
              f"int8 decode kernel {int8_gemv_gb_s or 0:.1f} GB/s, bf16 decode kernel {bf16_gemv_gb_s or 0:.1f} GB/s, "
              f"matmul fp32 {fp32_tflops:.2f} / bf16 {bf16_tflops or 0:.2f} TFLOP/s; other load on the machine lowers "
              f"the numbers.",
    )
