"""selfhost's C kernels against pure-Python references, from a bare Python: no numpy, no torch.

.ci/cpu-paths runs this under qemu-user on CPUs this machine is not: aarch64 without and
with the dotprod extension, x86-64 with AVX2 but no AVX-512, x86-64 without AVX. It runs
natively too (tests/c/test_cpu_paths.py). Buffers are `array` objects, passed to the
kernels by address as selfhost's layers pass tensors' data_ptr().

    python check_kernels.py BUILD [--available NAMES] [--others-unavailable] [--int8-isa ISA]

BUILD holds the compiled extensions in their package layout (BUILD/selfhost/_cpu_pool*.so,
BUILD/selfhost/layers/_matvec_cpu*.so, ...); a kernel's name is its module's without the
leading underscore and `_cpu` (`matvec`, `int8`, `gemm`, `cpu_pool`). Every module found is
imported. Those named in --available must say available() and match their reference; with
--others-unavailable, every other module that has an available() must say False (the x86-only
kernels on aarch64, the AVX-512 ones on an AVX2 CPU). The pool, RMSNorm and paged decode
attention have no available(): they run on every CPU and are always checked. Prints one line
per kernel and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import array
import importlib
import math
import os
import random
import struct
import sys
import time

U = 2.0**-24  # unit roundoff of fp32
THREADS = (1, 2, 3)  # 1: the caller alone; 2 and 3: the pool's workers take chunks too


class Mismatch(Exception):
    pass


def f32(value: float) -> float:
    """value rounded to fp32, as the kernels' float arithmetic rounds it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def floats(rng: random.Random, n: int, scale: float = 1.0) -> array.array:
    return array.array("f", (rng.uniform(-scale, scale) for _ in range(n)))


def address(buffer: array.array) -> int:
    return buffer.buffer_info()[0]


def expect_close(what: str, got: float, want: float, bound: float) -> None:
    if not abs(got - want) <= bound:  # `not <=` also catches NaN
        raise Mismatch(f"{what} = {got!r}, reference {want!r} (allowed error {bound:.3g})")


def expect_all_close(what: str, got, want: list[float], bounds: list[float], row_length: int) -> None:
    """got[i] against want[i] within bounds[i], for a (rows, row_length) result laid out flat."""
    for i, (value, bound) in enumerate(zip(want, bounds)):
        expect_close(f"{what}[{i // row_length},{i % row_length}]", got[i], value, bound)


# ---- fp32 few-row product: y = x @ W^T ----

MATVEC_SHAPES = [  # (M, N, K): tails of the 8-float step and of the 4-row tile, several 32-row chunks
    (1, 1, 1), (1, 4, 8), (1, 5, 7), (1, 70, 37), (2, 3, 16), (3, 33, 9), (3, 97, 64), (31, 6, 100), (4, 4, 0),
]


def check_matvec(module) -> str:
    rng = random.Random(1)
    for M, N, K in MATVEC_SHAPES:
        x, w = floats(rng, M * K), floats(rng, N * K)
        want, bounds = [], []
        for m in range(M):
            for n in range(N):
                terms = [x[m * K + k] * w[n * K + k] for k in range(K)]
                want.append(math.fsum(terms))
                # fp32 sums of K products, in whatever order: within (K + 2) u of the sum of magnitudes
                bounds.append((K + 2) * U * sum(map(abs, terms)) + 1e-30)
        for num_threads in THREADS:
            y = array.array("f", [float("nan")]) * (M * N)
            module.matvec(address(x), address(w), address(y), M, N, K, num_threads)
            expect_all_close(f"matvec M={M} N={N} K={K} threads={num_threads}: y", y, want, bounds, N)
    return f"{len(MATVEC_SHAPES)} shapes x threads {THREADS}"


# ---- int8-weight linear: activations quantized per block of 32, integer block sums ----

INT8_SHAPES = [  # (M, N, K): partial last block and tile, fewer than a block, several 256-row chunks, 129 rows
    (1, 1, 32), (1, 5, 31), (2, 4, 64), (3, 7, 100), (1, 300, 40), (2, 513, 33), (129, 5, 40), (1, 3, 0), (0, 3, 32),
]


def quantize_row(row: list[float]) -> list[tuple[list[int], float]]:
    """The kernels' activation quantization, in fp32, block by block of 32:
    q = rint(x * (127 / amax)) and scale = amax / 127."""
    blocks = []
    for start in range(0, len(row), 32):
        values = row[start : start + 32]
        amax = max(abs(v) for v in values)
        inv = f32(127.0 / amax) if amax > 0 else 0.0
        blocks.append(([max(-128, min(127, round(f32(v * inv)))) for v in values], f32(amax / 127.0)))
    return blocks


def int8_reference(x, w, wscale, bias, M: int, N: int, K: int) -> tuple[list[float], list[float]]:
    """y in float64 from exact integer block sums, and a bound on each output's error: the
    kernel's sums are exact integers, so only its fp32 sum over blocks, lanes and bias rounds."""
    want, bounds = [], []
    for m in range(M):
        blocks = quantize_row(list(x[m * K : (m + 1) * K]))
        for n in range(N):
            total = magnitude = 0.0
            for b, (q, scale) in enumerate(blocks):
                products = [a * c for a, c in zip(q, w[n * K + 32 * b : n * K + 32 * b + len(q)])]
                total += sum(products) * scale
                magnitude += sum(map(abs, products)) * scale
            shift = bias[n] if bias is not None else 0.0
            want.append(total * wscale[n] + shift)
            bounds.append((K // 32 + 12) * U * (magnitude * wscale[n] + abs(shift)) + 1e-30)
    return want, bounds


def check_int8(module) -> str:
    rng = random.Random(2)
    cases = 0
    for M, N, K in INT8_SHAPES:
        # at least one element each: the kernel refuses a null address, which an empty array has
        x = floats(rng, max(M * K, 1), 3.0)
        w = array.array("b", (rng.randint(-127, 127) for _ in range(max(N * K, 1))))
        wscale = array.array("f", (rng.uniform(0.001, 0.02) for _ in range(N)))
        if M and K:  # a zero row (scale 0) and a row at full scale against full weights: each int16 lane
            x[0:K] = array.array("f", [0.0] * K)  # of plain NEON then holds 2 * 127 * 127, its largest sum
            if M > 1:
                x[K : 2 * K] = array.array("f", [2.0 if k % 3 else -2.0 for k in range(K)])
                w[0:K] = array.array("b", [127 if k % 3 else -127 for k in range(K)])
        for bias in (None, floats(rng, N)):
            want, bounds = int8_reference(x, w, wscale, bias, M, N, K)
            for num_threads in THREADS:
                y = array.array("f", [float("nan")]) * max(M * N, 1)
                module.linear(address(x), address(w), address(wscale), address(bias) if bias is not None else 0,
                              address(y), M, N, K, num_threads)
                cases += 1
                expect_all_close(f"int8 linear M={M} N={N} K={K} bias={bias is not None} threads={num_threads}: y",
                                 y, want, bounds, N)
    return f"{cases} products (isa {module.isa()})"


# ---- RMSNorm: out = x * rsqrt(mean(x^2) + eps) * (w + offset) ----

NORM_DIMS = [1, 3, 4, 15, 16, 17, 33, 64, 100, 576]


def check_norm(module) -> str:
    rng = random.Random(3)
    eps = 1e-6
    for dim in NORM_DIMS:
        rows = 3
        x, w = floats(rng, rows * dim, 2.0), floats(rng, dim)
        for offset in (0.0, 1.0):
            out = array.array("f", [float("nan")]) * (rows * dim)
            module.rms_norm(address(x), address(w), address(out), rows, dim, eps, offset)
            for r in range(rows):
                row = x[r * dim : (r + 1) * dim]
                scale = 1.0 / math.sqrt(math.fsum(v * v for v in row) / dim + eps)
                for i in range(dim):
                    want = row[i] * scale * f32(w[i] + offset)
                    # squares summed in fp32 (all positive: relative error within dim u), then a few roundings
                    bound = (dim + 8) * U * abs(want) + 1e-30
                    expect_close(f"rms_norm dim={dim} offset={offset}: out[{r},{i}]", out[r * dim + i], want, bound)
    # Rows split over the pool, and the residual add in the same pass (sum = x + y, out = norm(sum)).
    rows, dim = 37, 64
    for threads in THREADS:
        x, y, w = floats(rng, rows * dim, 2.0), floats(rng, rows * dim, 2.0), floats(rng, dim)
        summed = [f32(a + b) for a, b in zip(x, y)]
        out, got = array.array("f", [float("nan")]) * (rows * dim), array.array("f", [float("nan")]) * (rows * dim)
        module.add_rms_norm(address(x), address(y), address(got), address(w), address(out), rows, dim, eps, 0.0, threads)
        for i in range(rows * dim):
            expect_close(f"add_rms_norm threads={threads}: sum[{i}]", got[i], summed[i], 0.0)
        for r in range(rows):
            row = summed[r * dim : (r + 1) * dim]
            scale = 1.0 / math.sqrt(math.fsum(v * v for v in row) / dim + eps)
            for i in range(dim):
                want = row[i] * scale * w[i]
                expect_close(f"add_rms_norm threads={threads}: out[{r},{i}]", out[r * dim + i], want,
                             (dim + 8) * U * abs(want) + 1e-30)
    return f"{len(NORM_DIMS)} widths x 2 offsets; add + norm on {THREADS} threads"


# ---- decode attention over the paged cache (portable C off x86) ----

def check_paged_attention(module) -> str:
    """Two sequences, grouped query heads, blocks out of order; plain, soft-capped and windowed."""
    rng = random.Random(4)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks = 4, 2, 8, 4, 6, 3
    lens = array.array("q", [5, 11])
    tables = array.array("q", [4, 1, 0, 2, 5, 3])  # (S, MB)
    q = floats(rng, len(lens) * num_heads * head_dim)
    k = floats(rng, num_kv_heads * num_blocks * head_dim * block_size)  # (Hkv, NB, D, BS): dims-major
    v = floats(rng, num_kv_heads * num_blocks * block_size * head_dim)  # (Hkv, NB, BS, D): rows
    scale = 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    cases = 0
    for softcap, window in ((0.0, 0), (5.0, 0), (0.0, 6)):
        for num_threads in THREADS:
            out = array.array("f", [float("nan")]) * len(q)
            module.decode_attention(address(q), address(k), address(v), address(tables), address(lens), address(out),
                                    len(lens), num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks,
                                    scale, softcap, window, num_threads)
            cases += 1
            for s, length in enumerate(lens):
                first = length - window if 0 < window < length else 0
                for h in range(num_heads):
                    kv = h // group
                    qh = q[(s * num_heads + h) * head_dim : (s * num_heads + h + 1) * head_dim]
                    blocks = [tables[s * max_blocks + p // block_size] for p in range(first, length)]
                    keys = [[k[((kv * num_blocks + b) * head_dim + d) * block_size + p % block_size]
                             for d in range(head_dim)] for b, p in zip(blocks, range(first, length))]
                    values = [v[((kv * num_blocks + b) * block_size + p % block_size) * head_dim :][:head_dim]
                              for b, p in zip(blocks, range(first, length))]
                    scores = [scale * sum(a * b for a, b in zip(qh, key)) for key in keys]
                    if softcap:
                        scores = [math.tanh(x / softcap) * softcap for x in scores]
                    peak = max(scores)
                    weights = [math.exp(x - peak) for x in scores]
                    total = sum(weights)
                    for d in range(head_dim):
                        want = sum(wt * row[d] for wt, row in zip(weights, values)) / total
                        expect_close(f"decode_attention softcap={softcap} window={window} threads={num_threads}: "
                                     f"out[{s},{h},{d}]", out[(s * num_heads + h) * head_dim + d], want, 1e-5)
    return f"{cases} steps"


def check_pool(module) -> str:
    wrong = module.stress(300, 100, 4, 7)
    if wrong:
        raise Mismatch(f"{wrong} chunk runs were lost, doubled or given another job's context")
    return f"300 jobs on up to 4 threads, {module.num_workers()} workers"


# Where selfhost's Python calls a kernel only once it says available(), a call anyway must
# raise, not crash: the calls below pass null buffers, which a refusing kernel never reads.
REFUSING_CALLS = {
    "matvec": lambda module: module.matvec(0, 0, 0, 1, 1, 1, 1),
    "int8": lambda module: module.linear(0, 0, 0, 0, 0, 1, 1, 1, 1),
}


def check_refuses(name: str, module) -> str:
    if module.available():
        raise Mismatch("available() is True on a CPU it was not expected to run on")
    if name not in REFUSING_CALLS:
        return "imports, says not available"
    try:
        REFUSING_CALLS[name](module)
    except RuntimeError:
        return "imports, says not available, refuses to run"
    raise Mismatch("called where it is not available, it did not raise RuntimeError")


CHECKS_IF_AVAILABLE = {"matvec": check_matvec, "int8": check_int8}
CHECKS_ALWAYS = {"cpu_pool": check_pool, "norm": check_norm, "paged_attention": check_paged_attention}


def find_modules(build: str) -> dict[str, str]:
    """Kernel name -> module name, for every extension under build/selfhost."""
    found = {}
    for folder, _, files in os.walk(os.path.join(build, "selfhost")):
        for file in files:
            if file.endswith(".so"):
                relative = os.path.relpath(os.path.join(folder, file.split(".")[0]), build)
                module = relative.replace(os.sep, ".")
                found[file.split(".")[0].lstrip("_").removesuffix("_cpu")] = module
    return dict(sorted(found.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", help="folder holding selfhost/... with the compiled extensions")
    parser.add_argument("--available", default="", help="comma-separated kernels that must run here")
    parser.add_argument("--others-unavailable", action="store_true",
                        help="every other kernel with an available() must say False")
    parser.add_argument("--int8-isa", help="the instruction set the int8 kernel must report (neon, neon-dotprod, avx2)")
    args = parser.parse_args()
    modules = find_modules(args.build)
    available = [name for name in args.available.split(",") if name]
    for name in available:
        if name not in CHECKS_IF_AVAILABLE:
            parser.error(f"no reference check for {name!r}; checked: {', '.join(CHECKS_IF_AVAILABLE)}")
        if name not in modules:
            parser.error(f"{name!r} was not built: {args.build} holds {', '.join(modules) or 'no extension'}")
    sys.path.insert(0, os.path.abspath(args.build))
    failures = 0
    for name, module_name in modules.items():
        start = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            if not os.path.abspath(module.__file__).startswith(os.path.abspath(args.build)):
                raise Mismatch(f"imported {module.__file__}, not the build under {args.build}")
            if name in available:
                if not module.available():
                    raise Mismatch("available() is False where this kernel must run")
                if name == "int8" and args.int8_isa and module.isa() != args.int8_isa:
                    raise Mismatch(f"runs on {module.isa()!r}, expected {args.int8_isa!r}")
                outcome = CHECKS_IF_AVAILABLE[name](module)
            elif name in CHECKS_ALWAYS:
                outcome = CHECKS_ALWAYS[name](module)
            elif args.others_unavailable and hasattr(module, "available"):
                outcome = check_refuses(name, module)
            else:
                outcome = "imports" + (f", available() = {module.available()}" if hasattr(module, "available") else "")
            print(f"ok   {name}: {outcome} ({time.perf_counter() - start:.1f} s)", flush=True)
        except (Mismatch, ImportError, RuntimeError, ValueError, TypeError) as error:
            failures += 1
            print(f"FAIL {name}: {error}", flush=True)
    if failures:
        print(f"{failures} of {len(modules)} kernels failed on {os.uname().machine}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
