"""Build step for selfhost's compiled CPU kernels, one extension each:

- _cpu_pool.c                   the process's one worker pool, which the kernels below reach
                                through a capsule (their threads and chunks run on it)
- quant/_int8_cpu.c             int8-weight linear layers (AVX2; NEON, with dotprod where present)
- layers/_matvec_cpu.c          the fp32 few-row product of decode steps (AVX2; NEON)
- layers/_gemm_cpu.c            the fp32 many-row product of prompts and batches (AVX-512)
- layers/_bf16_tiles_cpu.c      bf16-weight products in the AMX tile layout (AMX; AVX-512 for few rows)
- layers/_norm_cpu.c            RMSNorm in one pass
- layers/_activation_cpu.c      SwiGLU (silu(gate) * up) in one pass (AVX-512)
- layers/_token_mask_cpu.c      constrained decoding's token masks applied to logits (portable C)
- layers/_moe_cpu.c             a mixture-of-experts layer's routed experts in one call, through the
                                kernels above (their `_kernels` capsules)
- engine/_paged_attention_cpu.c decode attention read in place from the paged KV cache
- engine/_prefill_attention_cpu.c prompt-chunk attention over the paged KV cache (AVX-512; AMX tiles)
- engine/_decode_layers_cpu.c   a decode step's decoder layers in one call, through the kernels
                                above (their `_kernels` capsules, _kernel_capsules.h)

Project metadata lives in pyproject.toml. Every extension is optional: where one
cannot be compiled, `pip install` still succeeds and selfhost uses PyTorch's (or
numpy's) kernels instead. .ci/cpu-paths builds each of them for aarch64 and x86-64 with
these flags and checks them under qemu-user on the CPUs this machine is not.
"""

import sys

from setuptools import Extension, setup

POSIX = sys.platform != "win32"


def kernel(module: str, uses_pool: bool = False, headers: tuple[str, ...] = ()) -> Extension:
    """selfhost.<module> built from src/selfhost/<module path>.c (headers: its own, under src/selfhost).

    A module that uses the pool imports selfhost._cpu_pool when it loads; without it, the
    module's import fails and selfhost takes PyTorch's path for that kernel."""
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
        kernel("_cpu_pool", headers=("_cpu_pool.h",)),
        kernel("quant._int8_cpu", uses_pool=True,
               headers=("quant/_int8_block_avx2.h", "quant/_int8_widened_avx512.h", "quant/_int8_rows_vnni.h",
                        "quant/_int8_tiles_amx.h", "_amx_tiles.h", "_transpose_avx512.h", "_exp_avx512.h",
                        "layers/_swiglu_avx512.h", "_kernel_capsules.h")),
        kernel("layers._matvec_cpu", uses_pool=True),
        kernel("layers._gemm_cpu", uses_pool=True, headers=("_kernel_capsules.h", "layers/_row_argmax_avx512.h")),
        kernel("layers._bf16_tiles_cpu", uses_pool=True,
               headers=("_amx_tiles.h", "_kernel_capsules.h", "_exp_avx512.h", "layers/_swiglu_avx512.h",
                        "layers/_row_argmax_avx512.h")),
        kernel("layers._norm_cpu", uses_pool=True, headers=("_kernel_capsules.h",)),
        kernel("layers._activation_cpu", uses_pool=True,
               headers=("_exp_avx512.h", "_kernel_capsules.h", "layers/_swiglu_avx512.h")),
        kernel("layers._token_mask_cpu"),
        kernel("layers._moe_cpu", uses_pool=True,
               headers=("_kernel_capsules.h", "quant/_int8_block_avx2.h", "quant/_int8_widened_avx512.h",
                        "quant/_int8_rows_vnni.h")),
        kernel("engine._paged_attention_cpu", uses_pool=True,
               headers=("engine/_weighted_rows_avx512.h", "engine/_rope_store_avx512.h", "_transpose_avx512.h",
                        "_exp_avx512.h", "_kernel_capsules.h")),
        kernel("engine._decode_layers_cpu", headers=("_kernel_capsules.h",)),
        kernel("engine._prefill_attention_cpu", uses_pool=True,
               headers=("engine/_weighted_rows_avx512.h", "engine/_prefill_tiles_amx.h", "_exp_avx512.h", "_amx_tiles.h",
                        "_transpose_avx512.h")),
    ]
)
