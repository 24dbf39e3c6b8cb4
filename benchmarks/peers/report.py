"""The benchmark tables: speed, selfhost's speed-up over each row, greedy agreement,
and how much of the machine's physical limit each row used.

Plain text, printed with print(): a pipe or a log file gets every column whole.
A row whose peer did not run shows why in a numbered note under its table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from benchmarks.model_costs import decode_bytes_per_token, prompt_flops
from benchmarks.peers.driver import PeerRun
from selfhost.bench.machine_limits import MachineLimits, bandwidth_fraction, compute_fraction, describe

Metric = Callable[[dict], float]
DECODE_LEGEND = ("of read bandwidth: weight MB/token x tokens/s over the measured all-thread read bandwidth "
                 "(above 100%: weights partly served from cache)")
PROMPT_LEGEND = ("of peak matmul: the prompt's FLOP/s over torch's measured 2048x2048 product at the row's weight "
                 "precision (an engine's own kernels can beat it)")


def best_tok_s(task: dict) -> float:
    """The fastest run's output tokens per second."""
    return max(n / s for n, s in zip(task["output_tokens"], task["seconds"]))


def best_seconds(task: dict) -> float:
    return min(task["seconds"])


def agreement(tokens: list[list[list[int]]], reference: list[list[list[int]]]) -> str:
    """How many outputs (runs x prompts) equal the reference's token for token; where some
    differ, the share of leading tokens that matched, over all outputs."""
    pairs = [(a, b) for run, ref_run in zip(tokens, reference) for a, b in zip(run, ref_run)]
    same = sum(a == b for a, b in pairs)
    text = f"{same}/{len(pairs)}"
    if same < len(pairs):
        lead = sum(_common_prefix(a, b) for a, b in pairs) / max(1, sum(len(b) for _, b in pairs))
        text += f" (first {lead:.0%} of tokens same)"
    return text


def _others_cpu(task: dict) -> str:
    shares = task.get("others_cpu") or []
    return f"{max(shares):.0%}" if shares else "n/a"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers).rstrip(), *(line(r).rstrip() for r in rows)]


def speed_table(runs: list[PeerRun], task: str, metric: Metric, metric_header: str, show: Callable[[float], str],
                higher_is_better: bool, extra: dict[str, Callable[[PeerRun, float], str]]) -> list[str]:
    """One row per peer that was given `task`: the metric, selfhost's speed-up over the row
    (one column per selfhost row; > 1: selfhost is faster), `extra` columns, greedy
    agreement with the first selfhost row, the CPU other processes took meanwhile."""
    runs = [r for r in runs if task in r.peer.tasks]
    measured = {r.peer.label: metric(r.task(task)) for r in runs if r.task(task)}
    selfhost = [r for r in runs if r.peer.system == "selfhost" and r.peer.label in measured]
    reference = selfhost[0] if selfhost else next((r for r in runs if r.peer.label in measured), None)
    headers = ["system", metric_header, *(f"{s.peer.label} speed-up" for s in selfhost), *extra,
               f"same tokens as {reference.peer.label}" if reference else "same tokens", "others' CPU"]
    rows, notes = [], []
    for run in runs:
        if run.peer.label not in measured:
            notes.append(f"({len(notes) + 1}) {run.peer.label} did not run: {run.error or 'no result for ' + task}")
            rows.append([run.peer.label, f"not run ({len(notes)})", *("" for _ in headers[2:])])
            continue
        value = measured[run.peer.label]
        speedups = [(measured[s.peer.label] / value if higher_is_better else value / measured[s.peer.label])
                    for s in selfhost]
        same = agreement(run.task(task)["token_ids"], reference.task(task)["token_ids"])
        rows.append([run.peer.label, show(value), *(f"{x:.2f}x" for x in speedups),
                     *(column(run, value) for column in extra.values()), same,
                     _others_cpu(run.task(task))])
    legend = ["speed-up: how many times faster that selfhost row is than this row (> 1: selfhost is faster); "
              "others' CPU: share of the machine's CPU time other processes took during the row's timed runs "
              "(the most of any run)"]
    disturbed = [r.peer.label for r in runs if r.peer.label in measured and
                 max(r.task(task).get("others_cpu") or [0.0]) > DISTURBED_SHARE]
    if disturbed:
        legend.append(f"warning: other processes took over {DISTURBED_SHARE:.0%} of the CPU while these rows ran, "
                      f"so they are slower than this machine allows: {', '.join(disturbed)}")
    return [*render(headers, rows), *(legend if selfhost else []), *notes]


def decode_extra_columns(limits: MachineLimits | None, model_dir: Path) -> dict[str, Callable[[PeerRun, float], str]]:
    """Weights read per token and the share of the read bandwidth that makes at the row's speed."""
    def read(run: PeerRun) -> float:
        return decode_bytes_per_token(model_dir, run.peer.weight_precision, run.peer.head_precision)

    def weights(run: PeerRun, tok_s: float) -> str:
        return f"{read(run) / 1e6:.0f}"

    def share(run: PeerRun, tok_s: float) -> str:
        if limits is None:
            return "n/a"
        return f"{bandwidth_fraction(read(run), tok_s, limits.read_gb_s):.0%}"

    return {"weight MB/token": weights, "of read bandwidth": share}


def prompt_extra_columns(limits: MachineLimits | None, model_dir: Path,
                         prompt_tokens: int) -> dict[str, Callable[[PeerRun, float], str]]:
    """Prompt GFLOP/s and its share of the peak matmul rate at the row's weight precision."""
    flops = prompt_flops(model_dir, prompt_tokens)

    def rate(run: PeerRun, seconds: float) -> str:
        return f"{flops / seconds / 1e9:.0f}"

    def share(run: PeerRun, seconds: float) -> str:
        peak = limits.matmul_gflop_s.get(run.peer.weight_precision) if limits else None
        fraction = compute_fraction(flops, seconds, peak)
        return "n/a" if fraction is None else f"{fraction:.0%} of {run.peer.weight_precision}"

    return {"prompt GFLOP/s": rate, "of peak matmul": share}


# Others' share of the CPU during a timed run above which the row is flagged as disturbed.
DISTURBED_SHARE = 0.1
# A 1-minute load above this before the probes means something else was running.
BUSY_LOAD = 0.5


def limits_lines(limits: MachineLimits | None, reason: str | None) -> list[str]:
    if limits is None:
        return [f"machine limits: not measured ({reason})"]
    busy = [f"  warning: 1-minute load {limits.load_avg[0]:.2f} before the probes (something ran recently or still "
            "runs): the numbers below may be disturbed, OpenMP threads that spin-wait (transformers' defaults) most"]
    return describe(limits) + (busy if limits.load_avg[0] > BUSY_LOAD else [])


def settings_lines(runs: list[PeerRun]) -> list[str]:
    """What each peer reported it ran with (versions, dtype, threads, binding), one line each."""
    lines = ["settings each peer reported:"]
    for run in runs:
        if run.result:
            info = ", ".join(f"{k}={v}" for k, v in run.result["info"].items() if v is not None and v != "")
            rounds = run.result.get("rounds")
            lines.append(f"  {run.peer.label}: {info}; load {run.result['load_seconds']:.0f} s"
                         + (f" (the slowest of {rounds} rounds), processes" if rounds else ", process")
                         + f" {run.seconds:.0f} s")
        lines += [f"  {run.peer.label}: {note}" for note in run.notes]
    return lines


def to_json(limits: MachineLimits | None, runs: list[PeerRun]) -> dict:
    """Everything measured, for --save-json."""
    return {
        "limits": json.loads(limits.to_json()) if limits else None,
        "runs": [{"label": r.peer.label, "system": r.peer.system, "settings": r.peer.settings,
                  "weight_precision": r.peer.weight_precision, "error": r.error, "notes": r.notes,
                  "seconds": r.seconds, "result": r.result} for r in runs],
    }


def print_ttft_and_footer(runs, limits, model_dir, ttft_tokens: int, ttft_repeats: int, work_dir, save_json) -> None:
    """Both benchmarks' ending: the time-to-first-token table (ttft_tokens 0: none), each peer's
    settings, where the logs are, and the JSON of every result when asked."""
    import json

    if ttft_tokens:
        print(f"\nPrompt of {ttft_tokens} tokens: time to first token, best of {ttft_repeats}")
        print(*speed_table(runs, "ttft", best_seconds, "TTFT ms", lambda s: f"{s * 1e3:.0f}", higher_is_better=False,
                           extra=prompt_extra_columns(limits, model_dir, ttft_tokens)),
              PROMPT_LEGEND, sep="\n")
    print()
    print(*settings_lines(runs), sep="\n")
    print(f"logs and results: {work_dir}")
    if save_json:
        save_json.write_text(json.dumps(to_json(limits, runs), indent=1))
