"""The shrink report's outputs: a terminal table, shrink_report.md, shrink_report.json and frontier.png."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from selfhost.shrink.report import VariantRow, frontier

JSON_FILE = "shrink_report.json"
MARKDOWN_FILE = "shrink_report.md"
PLOT_FILE = "frontier.png"
COLUMNS = ("variant", "parameters", "weights MB", "x base", "decode tok/s", "x base", "batch tok/s", "perplexity",
           "vs base", "frontier")


def table_rows(rows: list[VariantRow]) -> list[tuple[str, ...]]:
    """Cells of each row, relative figures against the first variant (the base)."""
    base, best = rows[0], set(frontier(rows))
    return [(
        r.name,
        f"{r.num_params:,}" if r.num_params is not None else "-",
        f"{r.weight_bytes / 1e6:.2f}",
        f"{r.weight_bytes / base.weight_bytes:.2f}",
        f"{r.decode_tok_s:,.0f}",
        f"{r.decode_tok_s / base.decode_tok_s:.2f}",
        f"{r.batch_tok_s:,.0f}",
        f"{r.perplexity:.2f}",
        f"{100 * (r.perplexity / base.perplexity - 1):+.1f}%",
        "yes" if r.name in best else "",
    ) for r in rows]


def print_table(rows: list[VariantRow], title: str) -> None:
    from rich.table import Table

    from selfhost.cli.console import make_console

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    make_console().print(table)


def render_md(rows: list[VariantRow], about: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    table = "\n".join(lines)
    return f"""# Shrink report: {about['model']}

Every variant measured on this machine, the same way: weights in memory; single-stream greedy decode of
{about['decode_tokens']} tokens after a 16-token prompt (median of {about['repeats']}); batched throughput with
{about['batch_size']} sequences at once; perplexity on `{about['text']}` ({about['eval_tokens']:,} tokens,
sliding windows). The frontier marks variants no other beats on both memory and perplexity.

{table}

- machine: {about['cpu']}, {about['threads']} thread(s); torch {about['torch']}; {about['date']}
- plot: {PLOT_FILE} (perplexity against weight memory, frontier joined)
"""


def write_json(rows: list[VariantRow], about: dict, path: Path) -> None:
    path.write_text(json.dumps({**about, "frontier": frontier(rows), "variants": [asdict(r) for r in rows]},
                               indent=2) + "\n")


def plot_frontier(rows: list[VariantRow], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = frontier(rows)
    by_name = {r.name: r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        on = r.name in best
        ax.scatter(r.weight_bytes / 1e6, r.perplexity, s=40, color="#2a7ab0" if on else "#999999", zorder=3)
        ax.annotate(r.name, (r.weight_bytes / 1e6, r.perplexity), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.plot([by_name[n].weight_bytes / 1e6 for n in best], [by_name[n].perplexity for n in best],
            color="#2a7ab0", linewidth=1, zorder=2, label="frontier")
    ax.set_yscale("log")  # a weak variant must not flatten the differences between the good ones
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel("perplexity, log scale (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[VariantRow], about: dict, out: Path, overwrite: bool) -> Path:
    """shrink_report.{md,json} and frontier.png in `out`, which appears complete or not at all."""
    import shutil
    import tempfile

    from selfhost.train.export import check_output

    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / MARKDOWN_FILE).write_text(render_md(rows, about))
        write_json(rows, about, staging / JSON_FILE)
        plot_frontier(rows, staging / PLOT_FILE, f"{about['model']}: perplexity vs weight memory")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
