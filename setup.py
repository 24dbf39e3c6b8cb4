"""Build step for selfhost's compiled CPU kernels, one extension each:

- quant/_int8_cpu.c             int8-weight linear layers (AVX2)
- layers/_matvec_cpu.c          the fp32 few-row product of decode steps
- layers/_gemm_cpu.c            the fp32 many-row product of prompts and batches (AVX-512)
- layers/_norm_cpu.c            RMSNorm in one pass
- engine/_paged_attention_cpu.c decode attention read in place from the paged KV cache
- engine/_prefill_attention_cpu.c prompt-chunk attention over the paged KV cache (AVX-512)
The products and the attention kernel share the worker pool in _cpu_pool.h.

Project metadata lives in pyproject.toml. Every extension is optional: where one
cannot be compiled, `pip install` still succeeds and selfhost uses PyTorch's (or
numpy's) kernels instead.
"""

import sys

from setuptools import Extension, setup

POSIX = sys.platform != "win32"


def kernel(module: str, uses_pool: bool = False, headers: tuple[str, ...] = ()) -> Extension:
    """selfhost.<module> built from src/selfhost/<module path>.c (headers: its own, under src/selfhost)."""
    return Extension(
        f"selfhost.{module}",
        [f"src/selfhost/{module.replace('.', '/')}.c"],
        depends=(["src/selfhost/_cpu_pool.h"] if uses_pool else []) + [f"src/selfhost/{h}" for h in headers],
        extra_compile_args=["-O3", "-std=c11"] if POSIX else [],
        extra_link_args=["-pthread", "-lm"] if POSIX else [],
        optional=True,
    )


setup(
    ext_modules=[
        kernel("quant._int8_cpu", uses_pool=True),
        kernel("layers._matvec_cpu", uses_pool=True),
        kernel("layers._gemm_cpu", uses_pool=True),
        kernel("layers._norm_cpu"),
        kernel("engine._paged_attention_cpu", uses_pool=True, headers=("engine/_weighted_rows_avx512.h",)),
        kernel("engine._prefill_attention_cpu", uses_pool=True, headers=("engine/_weighted_rows_avx512.h",)),
    ]
)
