"""Build step for the compiled CPU kernels: the AVX2 int8 linear layer
(src/selfhost/quant/_int8_cpu.c), the fp32 few-row product used by decode steps
(src/selfhost/layers/_matvec_cpu.c), RMSNorm (src/selfhost/layers/_norm_cpu.c) and
attention over the paged KV cache
(src/selfhost/engine/_paged_attention_cpu.c).

Project metadata lives in pyproject.toml. Both extensions are optional: where they
cannot be compiled, `pip install` still succeeds and selfhost uses PyTorch's
kernels instead.
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11"]
link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "selfhost.quant._int8_cpu",
            ["src/selfhost/quant/_int8_cpu.c"],
            depends=["src/selfhost/_cpu_pool.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
        Extension(
            "selfhost.layers._matvec_cpu",
            ["src/selfhost/layers/_matvec_cpu.c"],
            depends=["src/selfhost/_cpu_pool.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
        Extension(
            "selfhost.layers._norm_cpu",
            ["src/selfhost/layers/_norm_cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args + ([] if sys.platform == "win32" else ["-lm"]),
            optional=True,
        ),
        Extension(
            "selfhost.engine._paged_attention_cpu",
            ["src/selfhost/engine/_paged_attention_cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args + ([] if sys.platform == "win32" else ["-lm"]),
            optional=True,
        ),
    ]
)
