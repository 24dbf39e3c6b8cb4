"""The machine's physical ceilings, measured in a few seconds, for benchmark tables.

A decode step streams every weight once, so its ceiling is how fast all cores
together read memory; a prompt is matrix products, so its ceiling is the fastest
matmul at the precision it runs in. `measure_machine_limits()` measures both
through torch on all threads (best of a few tries), says what the CPU is (model,
ISA flags, load), and `bandwidth_fraction` / `compute_fraction` say how much of a
ceiling a benchmark result used.

device_probe.py measures for the planner (selfhost's own kernels, one thread, a
copy); this measures the machine with the fastest library torch offers, so the
ceiling does not move when selfhost's kernels do.

    python -m selfhost.bench.machine_limits [--json] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from selfhost.bench.device_probe import last_level_cache_bytes
from selfhost.cpu_identity import ISA_FLAGS, read_cpu_identity
from selfhost.timing import best_seconds

PRECISIONS = ("fp32", "bf16", "int8")
# The read probe's buffer: several times any last-level cache, so it streams from DRAM.
_MIN_READ_BYTES = 2**30
# Square matmul sizes: large enough for the library's fastest blocking, small enough
# that one product takes tens of milliseconds on a few cores.
_MATMUL_SIZE = {"fp32": 2048, "bf16": 2048, "int8": 2048}
# Time each probe may take: the best of many short tries is steadier on a machine
# that other work interrupts than the best of three (about +-20% here otherwise).
_PROBE_BUDGET_S = 0.5


@dataclass(frozen=True)
class MachineLimits:
    cpu_model: str
    isa_flags: tuple[str, ...]
    threads: int  # threads the probes ran on
    cpu_count: int  # CPUs this process may run on
    load_avg: tuple[float, float, float]  # 1, 5 and 15 minutes, read before the probes
    date: str  # UTC, ISO 8601
    llc_bytes: int | None
    read_gb_s: float
    matmul_gflop_s: dict[str, float | None]  # per precision; None: torch has no such product here

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MachineLimits:
        fields = json.loads(text)
        fields["isa_flags"], fields["load_avg"] = tuple(fields["isa_flags"]), tuple(fields["load_avg"])
        return cls(**fields)


def available_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_read_gb_s(threads: int, llc_bytes: int | None = None) -> float:
    """Bytes/s of a sum over a buffer several times the last-level cache, on `threads` threads."""
    import torch

    n_bytes = max(_MIN_READ_BYTES, 4 * (llc_bytes or 0))
    data = torch.ones(n_bytes // 4, dtype=torch.float32)
    with _torch_threads(threads):
        seconds = _best_within_budget(data.sum)
    return n_bytes / seconds / 1e9


def measure_matmul_gflop_s(precision: str, threads: int) -> float | None:
    """Peak FLOP/s (int8: OP/s) of a square product through torch at `precision`:
    fp32 and bf16 `torch.mm` (oneDNN/MKL; AMX for bf16 where the CPU has it), int8
    `torch._int_mm`. None where this torch build has no such product on the CPU."""
    import torch

    size = _MATMUL_SIZE[precision]
    if precision == "int8":
        if not hasattr(torch, "_int_mm"):
            return None
        a = torch.randint(-127, 128, (size, size), dtype=torch.int8)
        product = lambda: torch._int_mm(a, a)  # noqa: E731
    else:
        a = torch.randn(size, size, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
        product = lambda: torch.mm(a, a)  # noqa: E731
    with _torch_threads(threads), torch.inference_mode():
        try:
            product()
        except (RuntimeError, NotImplementedError):  # no CPU kernel for this dtype in this build
            return None
        seconds = _best_within_budget(product)
    return 2 * size**3 / seconds / 1e9


def _best_within_budget(run: Callable[[], object]) -> float:
    """The best confirmed time of as many calls of `run` as fit in _PROBE_BUDGET_S (3 to 50)."""
    first = best_seconds(run, repeats=1)  # also the warm-up
    count = max(3, min(50, int(_PROBE_BUDGET_S / first)))
    return confirmed_best([best_seconds(run, repeats=1) for _ in range(count)])


def confirmed_best(seconds: list[float], tolerance: float = 0.1) -> float:
    """The shortest time that another try came within `tolerance` of, so one lone, freak
    fast reading does not become the machine's limit; with no two tries that close, the median."""
    ordered = sorted(seconds)
    for fast, next_fast in zip(ordered, ordered[1:]):
        if next_fast <= fast * (1 + tolerance):
            return fast
    return ordered[len(ordered) // 2]


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Torch ops run on `threads` threads inside the block; the count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_machine_limits(threads: int | None = None) -> MachineLimits:
    """Identity, load, read bandwidth and matmul peaks of this machine (about 3 s)."""
    cpu_count = available_cpu_count()
    threads = threads or cpu_count
    identity, load = read_cpu_identity(), os.getloadavg()  # load before the probes add their own
    llc = last_level_cache_bytes()
    return MachineLimits(
        cpu_model=identity.model, isa_flags=identity.isa_flags, threads=threads, cpu_count=cpu_count,
        load_avg=tuple(round(x, 2) for x in load), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        llc_bytes=llc, read_gb_s=measure_read_gb_s(threads, llc),
        matmul_gflop_s={p: measure_matmul_gflop_s(p, threads) for p in PRECISIONS},
    )


def describe(limits: MachineLimits) -> list[str]:
    """The header lines a benchmark prints above its table."""
    llc = f", last-level cache {limits.llc_bytes / 2**20:.0f} MiB" if limits.llc_bytes else ""
    peaks = ", ".join(f"{p} {_format_rate(v)}" for p, v in limits.matmul_gflop_s.items())
    return [
        f"machine: {limits.cpu_model}, {limits.cpu_count} CPUs{llc}",
        f"  ISA: {' '.join(limits.isa_flags) or 'none of ' + ' '.join(ISA_FLAGS)}",
        f"  load average {limits.load_avg[0]:.2f} {limits.load_avg[1]:.2f} {limits.load_avg[2]:.2f} "
        f"before the probes, {limits.date}",
        f"  measured on {limits.threads} threads: read bandwidth {limits.read_gb_s:.1f} GB/s; "
        f"peak matmul GFLOP/s (int8: GOP/s): {peaks}",
    ]


def _format_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def bandwidth_fraction(bytes_per_token: float, tok_s: float, read_gb_s: float) -> float:
    """Share of the read bandwidth a decode of `tok_s` tokens/s used, each token reading
    `bytes_per_token` of weights. Above 1 the weights were (partly) served from cache."""
    return bytes_per_token * tok_s / (read_gb_s * 1e9)


def compute_fraction(flops: float, seconds: float, peak_gflop_s: float | None) -> float | None:
    """Share of the peak matmul rate `flops` of work done in `seconds` reached; None without a peak."""
    if not peak_gflop_s:
        return None
    return flops / seconds / (peak_gflop_s * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure this machine's read bandwidth and peak matmul rates.")
    ap.add_argument("--threads", type=int, default=None, help="threads for the probes (default: all CPUs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    limits = measure_machine_limits(args.threads)
    print(limits.to_json() if args.json else "\n".join(describe(limits)))


if __name__ == "__main__":
    main()
