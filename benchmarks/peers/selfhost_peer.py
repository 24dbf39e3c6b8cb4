"""selfhost as a peer: `LLM(model).generate` through the public API, in a process of its own.

selfhost is imported first, as its README asks (it sets the OpenMP wait policy
before torch loads); torch then gets the thread count every system gets, which
the engine reads as "all threads" for its thread chooser.

settings: {"weight_dtype": None | "bfloat16", "quantization": None | "int8", "kv_cache_memory": None | "3GiB",
           "kv_cache_dtype": "auto" | "int8"}
"""

from __future__ import annotations

import sys
from typing import Any


def launch() -> tuple[str, dict[str, str], list[str]]:
    """(Python, environment additions, notes): the benchmark's own Python, nothing added."""
    return sys.executable, {}, []


class SelfhostEngine:
    def __init__(self, model_dir: str, threads: int, weight_dtype: str | None, kv_cache_memory: str | None,
                 kv_cache_dtype: str = "auto", quantization: str | None = None):
        import selfhost  # first: sets the OpenMP wait policy before torch loads
        import torch

        from selfhost import LLM, SamplingParams

        torch.set_num_threads(threads)
        self.llm = LLM(model_dir, device="cpu", weight_dtype=weight_dtype, quantization=quantization,
                       kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype)
        self.params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        self._info = {"selfhost": selfhost.__version__, "torch": torch.__version__, "weight_dtype": weight_dtype,
                      "quantization": quantization,
                      "kv_cache_dtype": str(self.llm.kv_cache_dtype).removeprefix("torch."), "threads": threads}

    @property
    def info(self) -> dict[str, Any]:
        stats = self.llm.engine.stats()  # what the thread chooser settled on, after the tasks
        return {**self._info, "threads_small_steps": stats.cpu_threads_small_steps,
                "threads_large_steps": stats.cpu_threads_large_steps}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return [list(o.token_ids) for o in self.llm.generate(prompts, self.params(max_tokens))]


def load(job: dict[str, Any]) -> SelfhostEngine:
    settings = job["settings"]
    return SelfhostEngine(job["model_dir"], job["threads"], settings.get("weight_dtype"),
                          settings.get("kv_cache_memory"), settings.get("kv_cache_dtype", "auto"),
                          settings.get("quantization"))


if __name__ == "__main__":
    import job as peer_job  # the sibling module: this file runs as a script

    peer_job.run_peer(load)
