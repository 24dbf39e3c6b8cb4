"""selfhost: run open-weight language models on your own hardware, and know what it costs.

    from selfhost import LLM, SamplingParams
    llm = LLM()  # the embedded demo model; or a folder, Hub id or alias
    print(llm.generate("To be, or not", SamplingParams(max_tokens=40))[0].text)
"""

import os
import sys

# Before torch loads libgomp: idle OpenMP workers otherwise spin and compete with the
# threads that run selfhost's kernels. When decode products ran on OpenBLAS threads this
# cost ~70 -> ~2 tok/s on a 2-core AMD machine; with selfhost's own pool (_cpu_pool.c)
# and torch ops on one thread in decode steps, no difference was measured on a 2-core
# Xeon (2026-12-06), but other CPUs and busier machines may differ. libgomp reads the
# variable once, when torch loads it: if torch came first and the user set no policy, it
# is too late, and the engine says so once (engine/cpu_threads.py).
OMP_POLICY_MISSED = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from selfhost.cpu_identity import ONEDNN_ISA_WITHOUT_AMX, amx_disabled  # noqa: E402  (no torch: safe before it)

if amx_disabled():
    # oneDNN (torch's bf16 and int8 CPU products) reads its cap when it first runs (cpu_identity.py's
    # SELFHOST_NO_AMX).
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA_WITHOUT_AMX)

import importlib  # noqa: E402

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "StructuredOutput", "RequestOutput", "StreamDelta", "TokenLogprob"]
__version__ = "0.1.0"

# Public name -> its module, imported on first use: torch takes seconds to import,
# and `selfhost.layers` must be importable without the request types.
_EXPORTS = {
    "LLM": "selfhost.llm",
    "AsyncEngine": "selfhost.engine.async_engine",
    "SamplingParams": "selfhost.sampling_params",
    "StructuredOutput": "selfhost.structured_output",
    "RequestOutput": "selfhost.outputs",
    "StreamDelta": "selfhost.outputs",
    "TokenLogprob": "selfhost.outputs",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(_EXPORTS[name]), name)
