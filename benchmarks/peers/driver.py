"""Start each peer in a process of its own, with a clean environment; collect its result or why it has none.

A peer's environment is the caller's minus every thread and allocator variable
(OMP_*, KMP_*, GOMP_*, MKL_*, OPENBLAS_*, LD_PRELOAD): the benchmark imports
selfhost (which sets OMP_WAIT_POLICY at import), and neither that nor a leftover
of the shell may reach transformers or vLLM. Each peer then gets only the
variables its own launch() adds. Peers run one after another, never together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from selfhost.bench.machine_limits import MachineLimits

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = Path(__file__).resolve().parent
_TUNING_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_")
# launch() -> (Python to run the peer script, environment additions, notes for the report)
Launch = Callable[[], tuple[str, dict[str, str], list[str]]]


@dataclass(frozen=True)
class Peer:
    system: str  # "selfhost", "transformers" or "vllm": picks benchmarks/peers/<system>_peer.py
    label: str  # the row's name
    settings: dict[str, Any]  # handed to the peer script as the job's settings
    weight_precision: str  # "fp32", "bf16" or "int8": bytes each weight costs, and the peak its prompts run against
    tasks: tuple[str, ...]  # names of the benchmark's tasks this peer runs
    head_precision: str | None = None  # the output head's, where the system keeps it in another precision


@dataclass
class PeerRun:
    peer: Peer
    result: dict[str, Any] | None = None  # the peer's JSON (job.py's result)
    error: str | None = None  # why there is no result
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole process: start, load, warm-up, tasks

    def task(self, name: str) -> dict[str, Any] | None:
        return (self.result or {}).get("tasks", {}).get(name)


def clean_environment(additions: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_TUNING_PREFIXES) and k != "LD_PRELOAD"}
    return {**env, **additions}


def run_peer(peer: Peer, launch: Launch, job: dict[str, Any], work_dir: Path, timeout_s: float) -> PeerRun:
    """Run one peer to completion; any failure (no venv, crash, timeout) is the run's error."""
    slug = peer.label.replace(" ", "-").lower()
    run = PeerRun(peer)
    try:
        python, env_additions, run.notes = launch()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        run.error = str(err)
        return run
    job_path, result_path, log_path = (work_dir / f"{slug}.{suffix}" for suffix in ("job.json", "result.json", "log"))
    job_path.write_text(json.dumps(job))
    command = [python, str(PEERS_DIR / f"{peer.system}_peer.py"), str(job_path), str(result_path)]
    print(f"running {peer.label} (log: {log_path})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        # A session of its own: vLLM spawns engine and worker processes, which must end with it.
        proc = subprocess.Popen(command, env=clean_environment(env_additions), cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.error = f"timed out after {timeout_s:.0f} s (log: {log_path})"
        finally:
            _end_process_group(proc)
    run.seconds = time.perf_counter() - start
    if run.error:
        return run
    if not result_path.exists():
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-2:])
        run.error = f"exited with status {proc.returncode} and no result: {tail} (log: {log_path})"
        return run
    result = json.loads(result_path.read_text())
    if "error" in result:
        run.error = f"{result['error']} (log: {log_path})"
    else:
        run.result = result
    return run


def run_peers(peers: list[Peer], launch: dict[str, Launch], job_for: Callable[[Peer], dict[str, Any]],
              work_dir: Path, timeout_s: float, rounds: int = 1) -> list[PeerRun]:
    """Every peer `rounds` times, in turn (p1, p2, .. then p1, p2, .. again), one process each: a
    VM whose speed drifts over minutes then slows or speeds every system alike, not whichever
    happened to run in its slow minutes. Each peer's timed runs of all its rounds are pooled."""
    runs: dict[str, list[PeerRun]] = {p.label: [] for p in peers}
    for round_index in range(rounds):
        for peer in peers:
            folder = work_dir if rounds == 1 else work_dir / f"round-{round_index + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            runs[peer.label].append(run_peer(peer, launch[peer.system], job_for(peer), folder, timeout_s))
    return [pool_rounds(runs[p.label]) for p in peers]


def pool_rounds(rounds: list[PeerRun]) -> PeerRun:
    """One peer's rounds as one run: the timed runs of every round that produced a result, in order;
    a round that failed is a note (all failed: the first one's error)."""
    done = [r for r in rounds if r.result is not None]
    first = rounds[0]
    pooled = PeerRun(first.peer, notes=list(first.notes), seconds=sum(r.seconds for r in rounds))
    pooled.notes += [f"round {i + 1} of {len(rounds)}: {r.error}" for i, r in enumerate(rounds) if r.result is None]
    if not done:
        pooled.error = first.error
        return pooled
    result = json.loads(json.dumps(done[0].result))  # a copy: the rounds' own results stay as they were
    for extra in done[1:]:
        for name, task in extra.result.get("tasks", {}).items():
            into = result["tasks"].setdefault(name, {key: [] for key in task})
            for key, values in task.items():
                into.setdefault(key, []).extend(values)
    if len(rounds) > 1:  # the slowest load, and how many rounds the timed runs come from
        result["load_seconds"] = max(r.result.get("load_seconds", 0.0) for r in done)
        result["rounds"] = len(done)
    pooled.result = result
    return pooled


def _end_process_group(proc: subprocess.Popen) -> None:
    """End what the peer left running in its session (its own group only), then reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is empty: everything has exited
            break
        time.sleep(1.0)
    if proc.poll() is None:
        proc.wait()


def measure_limits(threads: int) -> tuple[MachineLimits | None, str | None]:
    """The machine's limits, probed in a fresh process before any peer runs (so no engine's
    threads or caches are around); (None, reason) when the probe fails."""
    proc = subprocess.run([sys.executable, "-m", "selfhost.bench.machine_limits", "--json", "--threads", str(threads)],
                          env=clean_environment({}), cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the probe exited with status {proc.returncode}: {last}"
    return MachineLimits.from_json(proc.stdout.strip().splitlines()[-1]), None


def ensure_model(model_dir: Path) -> Path:
    """The benchmark model (benchmarks/common.py), built once in a separate process so the
    benchmark itself never loads torch."""
    if not (model_dir / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.common", str(model_dir)], cwd=REPO_ROOT, check=True,
                       env=clean_environment({}))
    return model_dir
