"""The cost report: a PNG of monthly cost against monthly volume, and an HTML page around it."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from selfhost.plan.cost import CostComparison

_HTML = jinja2.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>selfhost cost: {{ title }}</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}td,th{padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}</style></head>
<body><h1>Self-hosting vs API: {{ title }}</h1>
<p>Monthly volume: <b>{{ volume }}</b> tokens. Throughput: {{ throughput }} tokens/s.
{{ setup_line }}</p>
<table><tr><th>API</th><th>API $/M</th><th>API $/month</th><th>self $/month</th><th>self $/M</th>
<th>crossover tokens/month</th><th>break-even month</th></tr>
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
    comparisons: list[CostComparison], volume: float, title: str, rows: list[list[str]], notes: list[str],
    price_dates: str, out_dir: Path,
) -> tuple[Path, Path]:
    """Write cost.png and cost.html into `out_dir`; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_costs(comparisons, volume, out_dir / "cost.png")
    setup = comparisons[0].setup
    setup_line = (
        f"Rented at ${setup.rent_usd_per_hour:,.2f}/hour, always on." if setup.is_rented else
        f"Bought for ${setup.price_usd:,.0f}, amortised over {setup.amortisation_years:g} years; "
        f"{setup.power_w:g} W at ${setup.electricity_usd_per_kwh:g}/kWh while busy."
    )
    html = _HTML.render(
        title=title, volume=f"{volume:,.0f}", throughput=f"{setup.throughput_tok_s:,.1f}", setup_line=setup_line,
        rows=rows, notes=notes, price_dates=price_dates, png=base64.b64encode(png.read_bytes()).decode(),
    )
    html_path = out_dir / "cost.html"
    html_path.write_text(html)
    return png, html_path
