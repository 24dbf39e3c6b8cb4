"""The cost comparison as a table (terminal, HTML, JSON) and a PNG of monthly cost against volume.

Every output is built from the same rows: a value self-hosting never reaches
(a crossover or a break-even) is None in the row, null in cost.json and "never"
in the terminal and the HTML.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2

from selfhost.plan.cost import CostComparison
from selfhost.plan.units import format_count

# (row key, column header); the terminal table and the HTML page share these.
COLUMNS = (
    ("api", "API"),
    ("api_usd_per_m_tokens", "API $/M"),
    ("price_as_of", "price as of"),
    ("api_usd_per_month", "API $/month"),
    ("self_usd_per_month", "self $/month"),
    ("self_usd_per_m_tokens", "self $/M"),
    ("crossover_tokens_per_month", "crossover tokens/month"),
    ("break_even_months", "break-even month"),
)
HEADERS = tuple(header for _, header in COLUMNS)


def comparison_rows(comparisons: list[CostComparison], tokens_per_month: float) -> list[dict]:
    """One row per API: numbers, or None where self-hosting never gets there."""
    rows = []
    for comparison in comparisons:
        setup = comparison.setup
        rows.append({
            "api": comparison.api_name,
            "api_usd_per_m_tokens": comparison.api_usd_per_m_tokens,
            "price_as_of": comparison.price_as_of.isoformat() if comparison.price_as_of else None,
            "api_usd_per_month": comparison.api_monthly_usd(tokens_per_month),
            "self_usd_per_month": setup.monthly_usd(tokens_per_month),
            "self_usd_per_m_tokens": setup.usd_per_m_tokens(tokens_per_month),
            "crossover_tokens_per_month": comparison.crossover_tokens_per_month,
            "break_even_months": comparison.break_even_months(tokens_per_month),
            "rented": setup.is_rented,
        })
    return rows


def format_row(row: dict) -> list[str]:
    """A row's cells as text, in COLUMNS order."""
    self_per_m = row["self_usd_per_m_tokens"]
    crossover, months = row["crossover_tokens_per_month"], row["break_even_months"]
    return [
        row["api"], f"{row['api_usd_per_m_tokens']:,.2f}", row["price_as_of"] or "undated", f"{row['api_usd_per_month']:,.2f}",
        f"{row['self_usd_per_month']:,.2f}", f"{self_per_m:,.3f}" if self_per_m is not None else "-",
        format_count(crossover) if crossover is not None else "never",
        f"{months:,.1f}" if months is not None else ("rented" if row["rented"] else "never"),
    ]

_HTML = jinja2.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>selfhost cost: {{ title }}</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}td,th{padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}</style></head>
<body><h1>Self-hosting vs API: {{ title }}</h1>
<p>Monthly volume: <b>{{ volume }}</b> tokens. Throughput: {{ throughput }} tokens/s.
{{ setup_line }}</p>
<table><tr>{% for header in headers %}<th>{{ header }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</table>
<img alt="monthly cost against monthly volume" src="data:image/png;base64,{{ png }}" width="100%">
{% if notes %}<h2>Notes</h2><ul>{% for note in notes %}<li>{{ note }}</li>{% endfor %}</ul>{% endif %}
<p><small>Assumptions and formulas: docs/PLANNING.md. API prices: {{ price_dates }}.</small></p>
</body></html>
""")


def plot_costs(comparisons: list[CostComparison], volume: float, png_path: Path) -> Path:
    """Monthly cost of self-hosting and of each API, with each crossover marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = comparisons[0].setup
    crossovers = [c.crossover_tokens_per_month for c in comparisons if c.crossover_tokens_per_month]
    top = max([volume * 2, setup.capacity_tokens_per_month * 1.5, *(v * 2 for v in crossovers)])
    # Log axes: crossovers sit orders of magnitude apart, and a fixed monthly cost is a flat line.
    bottom = top / 1e5
    volumes = [bottom * (top / bottom) ** (i / 400) for i in range(401)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(volumes, [setup.monthly_usd(v) for v in volumes], color="black", lw=2.5, label=f"self-hosted: {setup.device_name}")
    for comparison in comparisons:
        (line,) = ax.plot(volumes, [comparison.api_monthly_usd(v) for v in volumes], label=comparison.api_name)
        crossover = comparison.crossover_tokens_per_month
        if crossover:
            ax.plot([crossover], [comparison.api_monthly_usd(crossover)], "o", color=line.get_color(), ms=8)
            ax.annotate(f"{crossover / 1e6:,.0f}M", (crossover, comparison.api_monthly_usd(crossover)),
                        textcoords="offset points", xytext=(6, -12), color=line.get_color())
    ax.axvline(volume, color="grey", ls="--", lw=1, label="your volume")
    ax.set_xlabel("tokens per month")
    ax.set_ylabel("US$ per month")
    ax.set_title("monthly cost against monthly volume (dots: crossovers)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def write_report(
    comparisons: list[CostComparison], volume: float, title: str, notes: list[str], price_dates: str, out_dir: Path,
) -> tuple[Path, Path, Path]:
    """Write cost.png, cost.html and cost.json into `out_dir`; return the three paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(comparisons, volume)
    png = plot_costs(comparisons, volume, out_dir / "cost.png")
    setup = comparisons[0].setup
    setup_line = (
        f"Rented at ${setup.rent_usd_per_hour:,.2f}/hour, always on." if setup.is_rented else
        f"Bought for ${setup.price_usd:,.0f}, amortised over {setup.amortisation_years:g} years; "
        f"{setup.power_w:g} W at ${setup.electricity_usd_per_kwh:g}/kWh while busy."
    )
    html = _HTML.render(
        title=title, volume=f"{volume:,.0f}", throughput=f"{setup.throughput_tok_s:,.1f}", setup_line=setup_line,
        headers=HEADERS, rows=[format_row(row) for row in rows], notes=notes, price_dates=price_dates,
        png=base64.b64encode(png.read_bytes()).decode(),
    )
    html_path = out_dir / "cost.html"
    html_path.write_text(html)
    json_path = out_dir / "cost.json"
    summary = {"title": title, "tokens_per_month": volume, "throughput_tok_s": setup.throughput_tok_s,
               "apis": rows, "notes": notes, "api_prices": price_dates}
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return png, html_path, json_path
