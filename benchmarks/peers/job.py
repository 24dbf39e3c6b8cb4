"""The job a peer process receives and the result it writes back, both plain JSON.

A peer script is started as `python <system>_peer.py JOB.json RESULT.json` by a
Python that may not be selfhost's (vLLM lives in a venv of its own), so this file
imports only the standard library; each peer script imports it as a sibling.

Job:    {"model_dir", "threads", "settings": {...system's own...},
         "tasks": [{"name", "runs": [[prompt token ids, ...], ...], "warmup_runs", "max_tokens"}]}
Result: {"info": {...}, "load_seconds", "tasks": {name: {"seconds": [...], "output_tokens": [...],
         "others_cpu": [...], "token_ids": [[ids per prompt] per timed run]}}, "load_avg_end"}
        or {"error": "why"}

`others_cpu` is the share of the machine's CPU time that went to anything but this
process during a timed run (other programs, the hypervisor's steal): a row measured
while something else ran says so, whatever the load average shows. Both sides of
the share come from one clock, /proc/stat's ticks, so it stays within [0, 1] even
for a run of a few ticks (busy ticks against wall time times CPUs did not).

Every run of a task has prompts of its own (the benchmark draws them), so an engine
with prefix caching never finds a timed prompt already cached by an earlier run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

# Greedy, eos ignored: every system produces exactly max_tokens per prompt.
Generate = Callable[[list[list[int]], int], list[list[int]]]


class Engine(Protocol):
    info: dict[str, Any]  # versions and settings the peer actually used, shown in the report

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]: ...


def time_task(engine: Engine, task: dict[str, Any]) -> dict[str, Any]:
    """Run every prompt set of `task` through `engine`; the first `warmup_runs` are not kept."""
    timed: dict[str, list] = {"seconds": [], "output_tokens": [], "others_cpu": [], "token_ids": []}
    for i, prompts in enumerate(task["runs"]):
        machine, own, start = machine_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        outputs = engine.generate(prompts, task["max_tokens"])
        seconds = time.perf_counter() - start
        others = others_share(machine, machine_cpu_seconds(), own_cpu_seconds() - own)
        if i < task["warmup_runs"]:
            continue
        timed["seconds"].append(seconds)
        timed["output_tokens"].append(sum(len(o) for o in outputs))
        timed["others_cpu"].append(others)
        timed["token_ids"].append([list(o) for o in outputs])
    return timed


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot, from one read of /proc/stat: busy is
    user, nice, system, irq, softirq and steal, total adds idle and iowait; (0.0, 0.0) where
    there is no /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    return busy * tick_s, (busy + idle + iowait) * tick_s


def others_share(before: tuple[float, float], after: tuple[float, float], own_seconds: float) -> float:
    """Share of the machine's CPU time between two machine_cpu_seconds() readings that went to
    anything but this process (which used `own_seconds`). Busy <= total in every reading, so the
    share is within [0, 1]; a run that spans no tick measured nothing and reads 0.0."""
    busy_s, total_s = after[0] - before[0], after[1] - before[1]
    if total_s <= 0:
        return 0.0
    return max(0.0, busy_s - own_seconds) / total_s


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_peer(load: Callable[[dict[str, Any]], Engine]) -> None:
    """The main of every peer script: load the engine, time the tasks, write the result.
    Any failure becomes {"error": ...} and exit status 1, which the driver reports as a row."""
    job_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    try:
        start = time.perf_counter()
        engine = load(job)
        result: dict[str, Any] = {"load_seconds": time.perf_counter() - start}
        first = job["tasks"][0]["runs"][0][0]
        engine.generate([first[:16]], 4)  # warm-up: allocator, thread pools, lazy initialisation
        result["tasks"] = {task["name"]: time_task(engine, task) for task in job["tasks"]}
        result["info"] = engine.info
        result["load_avg_end"] = os.getloadavg()
        status = 0
    except Exception as err:  # noqa: BLE001 - a peer that fails is a row with its reason, never a crash
        traceback.print_exc()
        result, status = {"error": f"{type(err).__name__}: {err}"}, 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
    sys.exit(status)
