"""Check `selfhost fit` against a measured selfhost run of a local checkpoint.

The measuring side of the planner: it loads and runs models, so it lives in
bench/, and hands plan/ only numbers (a DeviceSpec, a ModelSpec, measured sizes).

`measure_run` loads the checkpoint with the public API, configured as the plan
assumes (one sequence, `max_model_len` = the planned context, so the engine
allocates exactly that KV cache), and measures in the same process:

* memory: the peak of resident anonymous memory (sampled every millisecond
  while the model loads and generates a full context) plus the file-backed pages
  still resident at the end (shared-library code). The checkpoint's own pages,
  mapped while loading, are left out: they are page cache the kernel can drop,
  and `VmHWM` (reported as `peak_rss_bytes`) counts them.
* decode speed: the median time of one engine step while the sequence decodes
  (after its prompt), over a few generations of N tokens.
* this machine: the bandwidth probes of `--device local` (copy, fp32 and int8
  decode kernels), just before and just after the timing, so load on the machine
  affects both sides alike.

Run it in a fresh process (`measure_in_subprocess`): memory is process-wide.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfhost.catalog import DeviceSpec, ModelSpec
from selfhost.catalog.hf_config import model_from_config_file
from selfhost.plan.fit import FitReport, plan_fit
from selfhost.plan.precision import Precision, get_precision
from selfhost.plan.speed import SpeedEstimate, estimate_speed


@dataclass(frozen=True)
class DecodeTiming:
    decode_tok_s: float  # 1 / the median wall-clock decode step
    # 1 / the median on-CPU time of the engine's thread per step: what the step costs
    # when the process is not waiting for a core (other processes on a loaded machine)
    decode_tok_s_on_cpu: float
    cpu_share: float  # the process's CPU time over wall time while timing (1 per busy thread)
    load_average: tuple[float, float, float]  # 1/5/15-minute, just before the timing
    # this machine's probes (`--device local`), means of the runs before and after the timing
    copy_gb_s: float
    fp32_gemv_gb_s: float
    int8_gemv_gb_s: float | None
    matmul_tflops: float
    cache_bytes: int | None = None  # the last-level cache, and the fp32 kernel reading from it
    cached_gemv_gb_s: float | None = None


@dataclass(frozen=True)
class MeasuredRun:
    context: int
    new_tokens: int
    runtime_bytes: float  # resident after importing torch and transformers, before the model loads
    peak_bytes: float  # peak anonymous + file-backed resident at the end (see the module docstring)
    peak_rss_bytes: float  # VmHWM: also counts the checkpoint's transiently mapped pages
    timing: DecodeTiming | None  # None when no timing rounds were asked for


def model_from_checkpoint(path: Path) -> ModelSpec:
    """The planner's ModelSpec of a checkpoint folder, from its config.json."""
    return model_from_config_file(Path(path) / "config.json", Path(path).name)


def checkpoint_precision(path: Path) -> Precision:
    """The precision selfhost runs a checkpoint at on CPU: its quantization method, else fp32."""
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    return get_precision(quant["method"] if quant else "fp32")


def predict(path: Path, device: DeviceSpec, context: int, new_tokens: int) -> tuple[FitReport, SpeedEstimate]:
    """fit's report at the allocated context, and its speed at the decode phase's mean context."""
    model, precision = model_from_checkpoint(path), checkpoint_precision(path)
    report = plan_fit(model, device, precision, context, 1)
    decode_context = context - new_tokens // 2
    return report, estimate_speed(model, device, precision, decode_context, 1)


def measured_device(timing: DecodeTiming) -> DeviceSpec:
    """`--device local` as a calibration run measured it, next to its decode timing."""
    from selfhost.bench.device_probe import local_cpu_device

    return local_cpu_device(timing.copy_gb_s, timing.fp32_gemv_gb_s, timing.int8_gemv_gb_s, timing.matmul_tflops,
                            timing.cache_bytes, timing.cached_gemv_gb_s)


class _PeakSampler:
    """Polls /proc/self/status in a thread; keeps the peak of RssAnon."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak_anon_bytes = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_bytes = max(self.peak_anon_bytes, proc_status_bytes()["RssAnon"])
            time.sleep(self.interval_s)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon_bytes = max(self.peak_anon_bytes, proc_status_bytes()["RssAnon"])


def proc_status_bytes() -> dict[str, float]:
    """Memory lines of /proc/self/status (Linux), in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                fields[key] = float(value.split()[0]) * 1024  # the kernel reports kB
    return fields


def measure_run(path: Path, context: int, new_tokens: int, rounds: int = 3) -> MeasuredRun:
    """Measure one checkpoint in this process (see the module docstring); `rounds=0` skips the timing."""
    import torch  # noqa: F401  (imported before the baseline: runtime, not model)
    import transformers  # noqa: F401  (the tokenizer's library, likewise)

    from selfhost import LLM, SamplingParams

    prompt_tokens = context - new_tokens - 1
    if prompt_tokens < 1:
        raise ValueError(f"context {context} leaves no room for a prompt before {new_tokens} new tokens")
    before = proc_status_bytes()
    with _PeakSampler() as sampler:
        llm = LLM(str(path), max_model_len=context, max_num_seqs=1, enable_prefix_caching=False)
        vocab = llm.model.spec.vocab_size
        prompt = [3 + i % (vocab - 3) for i in range(prompt_tokens)]  # ids 0-2 are often special
        # The full context: the largest KV cache and workspace this run needs.
        llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    after = proc_status_bytes()  # before the probes add their buffers
    return MeasuredRun(
        context=context, new_tokens=new_tokens, runtime_bytes=before["RssAnon"] + before["RssFile"],
        peak_bytes=sampler.peak_anon_bytes + after["RssFile"], peak_rss_bytes=after["VmHWM"],
        timing=_time_decode(llm, prompt, new_tokens, rounds) if rounds else None,
    )


def _time_decode(llm, prompt: list[int], new_tokens: int, rounds: int) -> DecodeTiming:
    """Median time of one decode step (one sequence, after its prompt), over `rounds` generations."""
    from selfhost import SamplingParams
    from selfhost.bench import device_probe as probe

    cache_bytes = probe.last_level_cache_bytes()

    def probe_machine() -> tuple[float, float, float | None, float, float | None]:
        return (probe.measure_copy_bandwidth_gb_s(), probe.measure_fp32_gemv_gb_s(),
                probe.measure_int8_gemv_gb_s(), probe.measure_matmul_tflops(),
                probe.measure_cached_fp32_gemv_gb_s(cache_bytes) if cache_bytes else None)

    load = tuple(round(x, 2) for x in os.getloadavg())
    probes = [probe_machine()]
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    steps_s, steps_cpu_s, wall_s, process_s = [], [], 0.0, 0.0
    for round_index in range(rounds):
        seq = llm.engine.add_request(f"calibration-{round_index}", prompt, params)
        while not seq.output_ids:  # the prompt, and the first token it yields
            llm.engine.step()
        while not seq.is_finished:
            start, start_cpu, start_process = time.perf_counter(), time.thread_time(), time.process_time()
            llm.engine.step()
            steps_s.append(time.perf_counter() - start)
            steps_cpu_s.append(time.thread_time() - start_cpu)
            process_s += time.process_time() - start_process
        wall_s += sum(steps_s[-new_tokens:])
    probes.append(probe_machine())
    copy, gemv, int8_gemv, tflops, cached_gemv = (None if None in pair else sum(pair) / 2 for pair in zip(*probes))
    # Median steps: a burst of load from other processes moves them far less than a mean.
    return DecodeTiming(
        decode_tok_s=1 / statistics.median(steps_s), decode_tok_s_on_cpu=1 / statistics.median(steps_cpu_s),
        cpu_share=process_s / wall_s, load_average=load, copy_gb_s=copy, fp32_gemv_gb_s=gemv,
        int8_gemv_gb_s=int8_gemv, matmul_tflops=tflops, cache_bytes=cache_bytes, cached_gemv_gb_s=cached_gemv,
    )


def measure_in_subprocess(path: Path, context: int, new_tokens: int, rounds: int = 3) -> MeasuredRun:
    """`measure_run` in a fresh Python process, so its memory is this checkpoint's alone."""
    cmd = [sys.executable, "-m", "selfhost.bench.fit_calibration", str(path), str(context), str(new_tokens), str(rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{out.stderr[-2000:]}")
    fields = json.loads(out.stdout.strip().splitlines()[-1])
    if fields["timing"] is not None:
        timing = fields["timing"]
        fields["timing"] = DecodeTiming(**(timing | {"load_average": tuple(timing["load_average"])}))
    return MeasuredRun(**fields)


if __name__ == "__main__":
    checkpoint, context_arg, new_tokens_arg, rounds_arg = sys.argv[1:5]
    result = measure_run(Path(checkpoint), int(context_arg), int(new_tokens_arg), int(rounds_arg))
    print(json.dumps(asdict(result)))
