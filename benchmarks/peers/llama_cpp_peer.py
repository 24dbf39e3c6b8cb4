"""llama.cpp as a peer (llama-cpp-python), in a process of its own, at its best thread count.

The benchmark's model is exported to GGUF by selfhost's own exporter (`selfhost export
gguf`, the file llama.cpp's slow tests in tests/quant load and compare) before the peer
starts; `settings["gguf"]` names the file and `settings["type"]` its weight type (f16,
q8_0). Prompts go in as token ids, outputs come back as token ids (greedy: top_k 1,
temperature 0, no repeat penalty; eos ignored: the loop stops at max_tokens).

Its settings, from llama.cpp's documentation and llama-cpp-python's `Llama`:
* Threads: llama.cpp takes one count for generation (`n_threads`) and one for prompt
  batches (`n_threads_batch`); its docs advise the number of physical cores and to
  measure. `load()` measures: a short decode and a short prompt at every count from 1
  to the benchmark's --threads, and keeps the fastest of each (shown in the row's info).
* `n_batch` 512 and `n_ubatch` 512, llama-cpp-python's defaults; a context of 4096.
* Where llama_cpp comes from: a Python that imports it (`--llama-cpp-python`), a build
  directory put on PYTHONPATH (`--llama-cpp-pythonpath`, e.g. the one the slow GGUF tests
  use), or a venv the benchmark makes on first use with `pip install
  llama-cpp-python==LLAMA_CPP_VERSION` (a ~9 minute build; `--llama-cpp-cmake-args` are
  handed to it as CMAKE_ARGS). A default build died with "Illegal instruction" on q8_0
  products on one AMX Xeon VM (2026-12-06); `-DGGML_NATIVE=OFF -DGGML_AVX512=ON
  -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON` built one that runs there.

settings: {"gguf": path, "type": "f16" | "q8_0"}
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

LLAMA_CPP_VERSION = "0.3.36"
DEFAULT_VENV = Path.home() / ".cache" / "selfhost-bench" / "llama-cpp"
_PROBE_DECODE_TOKENS = 16
_PROBE_PROMPT_TOKENS = 256
CONTEXT = 4096


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot run here; the message is the reason shown in its row."""


def launch(python: Path | None, pythonpath: str | None, venv: Path,
           cmake_args: str = "") -> tuple[str, dict[str, str], list[str]]:
    """(Python, environment additions, notes) for the llama.cpp peer; makes the venv if needed."""
    if pythonpath is not None:
        missing = [p for p in pythonpath.split(os.pathsep) if not Path(p).is_dir()]
        if missing:
            raise LlamaCppUnavailable(f"--llama-cpp-pythonpath: {', '.join(missing)} is not a folder")
        return sys.executable, {"PYTHONPATH": pythonpath}, [f"llama_cpp from {pythonpath}"]
    # Imported here: the driver runs launch(); the peer's own Python may not have the package.
    from benchmarks.peers.venvs import peer_python

    python = peer_python(python, "--llama-cpp-python", venv, lambda v: install(v, cmake_args), LlamaCppUnavailable)
    return str(python), {}, []


def install(venv: Path, cmake_args: str = "") -> None:
    """A venv at `venv` with llama-cpp-python built from source; raises LlamaCppUnavailable with pip's last lines."""
    from benchmarks.peers.venvs import make_venv

    env = {**os.environ, **({"CMAKE_ARGS": cmake_args} if cmake_args else {})}
    make_venv(venv, [["install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]],
              f"llama-cpp-python=={LLAMA_CPP_VERSION} (builds llama.cpp, ~9 minutes; CMAKE_ARGS={cmake_args!r})",
              LlamaCppUnavailable, env=env)


class LlamaCppEngine:
    def __init__(self, gguf: str, weight_type: str, threads: int, probe_prompt: list[int]):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._gguf = gguf
        counts = range(1, max(1, threads) + 1)
        decode = {n: self._probe(n, n, probe_prompt[:16], _PROBE_DECODE_TOKENS) for n in counts}
        prompt = {n: self._probe(1, n, probe_prompt[:_PROBE_PROMPT_TOKENS], 1) for n in counts}
        self.n_threads, self.n_threads_batch = min(decode, key=decode.get), min(prompt, key=prompt.get)
        self.llm = self._open(self.n_threads, self.n_threads_batch)
        self.info = {
            "llama_cpp_python": llama_cpp.__version__, "type": weight_type, "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch, "n_batch": 512, "n_ctx": CONTEXT,
            "probe_decode_s": {str(n): round(s, 4) for n, s in decode.items()},
            "probe_prompt_s": {str(n): round(s, 4) for n, s in prompt.items()},
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }

    def _open(self, n_threads: int, n_threads_batch: int):
        return self._llama_cpp.Llama(self._gguf, n_ctx=CONTEXT, n_threads=n_threads, n_threads_batch=n_threads_batch,
                                     n_batch=512, n_ubatch=512, verbose=False)

    def _probe(self, n_threads: int, n_threads_batch: int, prompt: list[int], max_tokens: int) -> float:
        """Best of three: seconds to decode `max_tokens` after `prompt` at these thread counts."""
        llm = self._open(n_threads, n_threads_batch)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            self._greedy(llm, prompt, max_tokens)
            best = min(best, time.perf_counter() - start)
        llm.close()
        return best

    @staticmethod
    def _greedy(llm, prompt: list[int], max_tokens: int) -> list[int]:
        llm.reset()  # no prefix reuse between prompts: every run evaluates its whole prompt
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == max_tokens:
                break
        return out

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return [self._greedy(self.llm, p, max_tokens) for p in prompts]


def load(job: dict[str, Any]) -> LlamaCppEngine:
    settings = job["settings"]
    prompt = max((p for task in job["tasks"] for run in task["runs"] for p in run), key=len)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        raise LlamaCppUnavailable(f"llama_cpp does not import in {sys.executable}: {err}") from None
    return LlamaCppEngine(settings["gguf"], settings["type"], job["threads"], prompt)


if __name__ == "__main__":
    import job as peer_job  # the sibling module: this file runs as a script

    peer_job.run_peer(load)
