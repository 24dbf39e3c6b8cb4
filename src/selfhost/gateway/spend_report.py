"""`selfhost spend --out DIR`: the spend table as CSV and as a bar chart (PNG).

matplotlib is imported here only, with the Agg backend, so it works without a display.
"""

from __future__ import annotations

import csv
from pathlib import Path

from selfhost.gateway.spend import SpendRow


def write_spend_report(rows: list[SpendRow], by: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"spend_by_{by}.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([by, "requests", "input_tokens", "output_tokens", "cost_usd", "unpriced_requests"])
        for row in rows:
            writer.writerow([row.group, row.requests, row.input_tokens, row.output_tokens, format(row.cost_usd, "f"),
                             row.unpriced_requests])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = out_dir / f"spend_by_{by}.png"
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 4.0))
    ax.bar([r.group for r in rows], [float(r.cost_usd) for r in rows])
    for i, row in enumerate(rows):
        if row.unpriced_requests:  # never drawn as $0 without saying so
            ax.annotate(f"{row.unpriced_requests} unpriced", (i, 0), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("cost (USD)")
    ax.set_xlabel(by)
    ax.set_title(f"gateway spend by {by}")
    ax.grid(True, axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return [table, plot]
