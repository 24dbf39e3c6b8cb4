"""PNG plots of a bench result: throughput and latency percentiles per level.

The x axis is whatever the levels vary: concurrency for closed-loop runs,
request rate for Poisson runs. matplotlib is imported here only, with the Agg
backend, so plotting works without a display.
"""

from __future__ import annotations

from pathlib import Path

from selfhost.bench.result import BenchResult
from selfhost.bench.stats import LevelStats

THROUGHPUT_PNG = "throughput.png"
LATENCY_PNG = "latency.png"


def _x(level: LevelStats) -> float:
    return level.request_rate if level.request_rate is not None else float(level.concurrency or 0)


def _level_axis(ax, xs: list[float], label: str) -> None:
    """Log-2 x axis (levels usually double) ticked at the levels themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def write_plots(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    levels = [level for level in result.levels if level.num_ok > 0]
    if not levels:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = levels[0].request_rate is not None
    x_label = "request rate (req/s)" if by_rate else "concurrency (requests in flight)"
    xs = [_x(level) for level in levels]
    title = result.info.model + (f" @ {result.info.url}" if result.info.url else " (offline)")
    paths = {}

    throughput = [level.output_tok_s for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, throughput, "o-")
    for x, y, level in zip(xs, throughput, levels):
        left.annotate(f"{level.request_s:.2g} req/s", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    _level_axis(left, xs, x_label)
    left.set_ylabel("output tokens / s")
    left.set_title("Throughput")
    # The operating-point view: what each level's throughput costs in latency.
    timed = [(level.e2e_s.p50, y, level.label) for level, y in zip(levels, throughput) if level.e2e_s]
    right.plot([t for t, _, _ in timed], [y for _, y, _ in timed], "o-", color="tab:green")
    for t, y, label in timed:
        right.annotate(label, (t, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_xlabel("end-to-end latency p50 (s)")
    right.set_ylabel("output tokens / s")
    right.set_title("Throughput against latency")
    right.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths["throughput_plot"] = out_dir / THROUGHPUT_PNG
    fig.savefig(paths["throughput_plot"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (name, unit_scale, unit) in zip(axes, (("ttft_s", 1000, "ms"), ("tpot_s", 1000, "ms"), ("e2e_s", 1, "s"))):
        for quantile, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            points = [(x, getattr(level, name)) for x, level in zip(xs, levels) if getattr(level, name)]
            ax.plot([x for x, _ in points], [getattr(d, quantile) * unit_scale for _, d in points], style, label=quantile)
        ax.set_title(f"{name.removesuffix('_s').upper()} ({unit})")
        _level_axis(ax, xs, x_label)
        ax.legend()
    fig.suptitle(f"Latency percentiles: {title}", fontsize=10)
    fig.tight_layout()
    paths["latency_plot"] = out_dir / LATENCY_PNG
    fig.savefig(paths["latency_plot"], dpi=110)
    plt.close(fig)
    return paths
