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

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [level.output_tok_s for level in levels], marker="o", label="output tok/s")
    ax.set_xlabel(x_label)
    ax.set_ylabel("output tokens / s")
    ax.set_xscale("log", base=2)
    ax.set_title(f"Throughput - {title}", fontsize=10)
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    right.plot(xs, [level.request_s for level in levels], marker="s", color="tab:orange", label="requests/s")
    right.set_ylabel("requests / s")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
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
        ax.set_xlabel(x_label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency percentiles - {title}", fontsize=10)
    fig.tight_layout()
    paths["latency_plot"] = out_dir / LATENCY_PNG
    fig.savefig(paths["latency_plot"], dpi=110)
    plt.close(fig)
    return paths
