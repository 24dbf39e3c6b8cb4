"""selfhost: run open-weight language models on your own hardware, and know what it costs.

    from selfhost import LLM, SamplingParams
    llm = LLM()  # the embedded demo model; or a folder, Hub id or alias
    print(llm.generate("To be, or not", SamplingParams(max_tokens=40))[0].text)
"""

import os

# Before torch loads libgomp: idle OpenMP workers otherwise spin at full speed
# and starve the BLAS threads that run the decode matmuls (layers/linear.py).
# Measured on a 2-core machine: ~70 tok/s decode with PASSIVE, ~2 tok/s without.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from selfhost.outputs import RequestOutput, StreamDelta, TokenLogprob
from selfhost.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "RequestOutput", "StreamDelta", "TokenLogprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing torch takes seconds; defer it until the engine is actually used.
    if name == "LLM":
        from selfhost.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from selfhost.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
