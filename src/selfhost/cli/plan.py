"""`selfhost models`, `selfhost fit` and `selfhost cost`: pick a model, check it fits, price it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from selfhost.cli.console import make_console
from rich.table import Table
from rich.text import Text

from selfhost.catalog import DeviceSpec, ModelSpec, get_device, load_models
from selfhost.catalog.references import resolve_model_spec
from selfhost.errors import InvalidParameterError
from selfhost.plan.cost import CostComparison, SelfHostSetup
from selfhost.plan.fit import FitReport, is_edge_capable, plan_fit, rank_fits
from selfhost.plan.licence import licence_warnings
from selfhost.plan.precision import CPU_BF16, PRECISIONS, Precision, default_precision, get_precision
from selfhost.plan.report import HEADERS, comparison_rows, format_row
from selfhost.plan.serving_cost import device_setup, serving_speed
from selfhost.plan.speed import estimate_speculative
from selfhost.plan.units import format_count, parse_count, parse_rate
from selfhost.units import parse_size

console = make_console()

# Used for --device custom when --tflops is not given; printed as an assumption.
CUSTOM_DEFAULT_TFLOPS = 10.0

DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="Catalog device id, 'custom' or 'local'.")]
QuantOpt = Annotated[str | None, typer.Option("--quant", "-q", help=(
    "fp32, fp16 (bf16), int8 or int4; fit's default: what selfhost runs at (fp32 on a CPU, fp16 on a GPU)."))]
ContextOpt = Annotated[int | None, typer.Option(help="Tokens per sequence (prompt + output); default min(4096, model max).")]
ConcurrencyOpt = Annotated[int, typer.Option(help="Sequences served at once.")]
MemOpt = Annotated[str | None, typer.Option("--mem", help="custom device memory, e.g. 16GB.")]
BandwidthOpt = Annotated[str | None, typer.Option("--bandwidth", help="custom device bandwidth, e.g. 100GB/s.")]
TflopsOpt = Annotated[float | None, typer.Option("--tflops", help="custom device dense fp16 TFLOPS.")]
KindOpt = Annotated[str, typer.Option("--kind", help="custom device kind: gpu, soc or cpu.")]
KvCacheOpt = Annotated[str, typer.Option(help=(
    "The KV cache `selfhost run --kv-cache-dtype` would store: auto (the activations' dtype) or int8 (a byte "
    "per element plus an fp32 scale per token and head)."))]
UsersOpt = Annotated[str | None, typer.Option("--monthly-users", help="Monthly active users of the deployment, e.g. 800M.")]


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise InvalidParameterError(f"{name} must be > 0, got {value}")


def resolve_device(
    name: str, mem: str | None = None, bandwidth: str | None = None, tflops: float | None = None, kind: str = "gpu"
) -> DeviceSpec:
    key = name.strip().lower()
    if key == "local":
        from selfhost.bench.device_probe import measure_local_device

        with console.status("measuring this machine..."):
            return measure_local_device()
    if key == "custom":
        if mem is None or bandwidth is None:
            raise InvalidParameterError("--device custom needs --mem (e.g. 16GB) and --bandwidth (e.g. 100GB/s)")
        _positive("--tflops", tflops)
        peak = tflops if tflops is not None else CUSTOM_DEFAULT_TFLOPS
        return DeviceSpec(
            id="custom", name=f"custom {kind}", kind=kind, memory_gb=parse_size(mem, what="--mem") / 1e9,
            bandwidth_gb_s=parse_rate(bandwidth, what="--bandwidth") / 1e9, peak_fp16_tflops=peak, peak_int8_tops=peak,
            peak_fp32_tflops=peak / 2, sources=("user",),
            notes="" if tflops is not None else f"--tflops not given: assumed {CUSTOM_DEFAULT_TFLOPS:g} TFLOPS fp16.",
        )
    if mem or bandwidth or tflops:
        raise InvalidParameterError("--mem/--bandwidth/--tflops describe a custom device; use them with --device custom")
    return get_device(key)


def _warn(lines: list[str]) -> None:
    for line in lines:
        # emoji=False: ids such as `...:free` are not emoji codes.
        console.print(f"[yellow]warning:[/] {line}", highlight=False, emoji=False)


def models(
    family: Annotated[str | None, typer.Option(help="Family, e.g. llama3, qwen2.5, gemma3.")] = None,
    max_params: Annotated[str | None, typer.Option("--max-params", help="Largest total size, e.g. 8B or 500M.")] = None,
    licence: Annotated[str | None, typer.Option("--licence", help="Licence id or name part, e.g. apache, mit, llama.")] = None,
    edge: Annotated[bool, typer.Option("--edge", help="Only models that run int4 at 4k context on an 8 GB Jetson.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Also show licence names, publishers and Hub repos.")] = False,
) -> None:
    """List the model catalog, filtered."""
    from selfhost.catalog import get_licence

    limit = parse_count(max_params, what="--max-params") if max_params else None
    _positive("--max-params", limit)
    table = Table(title="selfhost model catalog")
    columns = ["alias", "family", "params", "context", "licence", "released", "edge"]
    if wide:
        columns += ["publisher", "Hub repo"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "context") else "left", no_wrap=column == "alias")
    shown = 0
    for spec in load_models().values():
        lic = get_licence(spec.licence)
        if family and family.lower() not in spec.family.lower():
            continue
        if limit and spec.params_b * 1e9 > limit:
            continue
        if licence and licence.lower() not in (spec.licence + " " + lic.name).lower():
            continue
        edge_ok = is_edge_capable(spec)
        if edge and not edge_ok:
            continue
        params = f"{spec.params_b:g}B" + (f" ({spec.active_params_b:g}B act.)" if spec.active_params_b else "")
        row = [spec.alias, spec.family, params, format_count(spec.arch.max_context),
               lic.name if wide else spec.licence, str(spec.release_date), "yes" if edge_ok else ""]
        if wide:
            row += [f"{spec.publisher} ({spec.country})", spec.hf_repo]
        table.add_row(*row)
        shown += 1
    if not shown:
        raise InvalidParameterError("no catalog model matches those filters")
    console.print(table)


def _unquantized_precision(spec: ModelSpec, dev: DeviceSpec) -> tuple[Precision, str | None]:
    """The precision `selfhost run` would give this checkpoint on `dev`, and why. On this
    machine's CPU that is `weight_dtype="auto"`'s measured choice for the model's MLP shape
    (cached per CPU model; the same call the loader makes), elsewhere the device kind's default."""
    if dev.id != "local" or dev.kind != "cpu":
        return default_precision(dev.kind), None
    from selfhost.models.weight_precision import choose_weight_dtype

    arch = spec.arch
    # a decode step streams the active linear weights: all but an untied input embedding (a lookup)
    streamed = 4 * (arch.active_params() - (0 if arch.tied_embeddings else arch.vocab * arch.hidden))
    choice = choose_weight_dtype(arch.hidden, arch.intermediate or arch.moe_intermediate, streamed_bytes=streamed)
    precision = CPU_BF16 if choice.weight_dtype == "bfloat16" else PRECISIONS["fp32"]
    return precision, f"planned as `selfhost run` loads it here: {choice.describe()}"


def _print_fit(report: FitReport) -> None:
    r, mem, speed = report.request, report.memory, report.speed
    table = Table(title=f"{r.model.alias} on {r.device.name}, {r.precision.name}, context {r.context:,} x {r.concurrency}")
    table.add_column("memory")
    table.add_column("GB", justify="right")
    for label, value in (("weights (incl. quant scales)", mem.weights_bytes), ("KV cache", mem.kv_cache_bytes),
                         ("activations / workspace", mem.workspace_bytes), ("runtime overhead", mem.overhead_bytes),
                         ("total", mem.total_bytes), ("usable on device", r.device.usable_bytes)):
        table.add_row(label, f"{value / 1e9:,.2f}")
    console.print(table)
    if report.fits:
        console.print(f"[green]fits[/] with {report.headroom_bytes / 1e9:,.2f} GB headroom")
    else:
        console.print(f"[red]does not fit[/]: {-report.headroom_bytes / 1e9:,.2f} GB short")
    console.print(f"largest context at concurrency {r.concurrency}: {report.max_context:,} tokens; "
                  f"most sequences at context {r.context:,}: {report.max_concurrency:,}")
    console.print(f"decode: {speed.decode_tok_s:,.1f} tokens/s total, {speed.decode_tok_s_per_seq:,.1f} per sequence "
                  f"({speed.decode_bound}-bound); prefill: {speed.prefill_tok_s:,.0f} tokens/s")
    if r.device.notes and r.device.id in ("custom", "local"):
        console.print(f"[dim]{r.device.notes}[/]")


def fit(
    model: Annotated[str | None, typer.Argument(help=(
        "Catalog alias, Hub id (catalog, or config.json in the HF cache) or checkpoint folder; "
        "omit to rank every model."))] = None,
    device: DeviceOpt = "rtx4090",
    quant: QuantOpt = None,
    context: ContextOpt = None,
    concurrency: ConcurrencyOpt = 1,
    mem: MemOpt = None,
    bandwidth: BandwidthOpt = None,
    tflops: TflopsOpt = None,
    kind: KindOpt = "gpu",
    monthly_users: UsersOpt = None,
    top: Annotated[int, typer.Option(help="Rows to show when ranking.")] = 25,
    kv_cache_dtype: KvCacheOpt = "auto",
    speculative_acceptance: Annotated[float | None, typer.Option(help=(
        "Also estimate speculative decoding at this per-token acceptance probability (0-1; "
        "`engine.stats()` and /metrics report what a workload reaches)."))] = None,
    num_speculative_tokens: Annotated[int, typer.Option(help="Tokens proposed per step, with --speculative-acceptance.")] = 4,
    draft: Annotated[str | None, typer.Option(help=(
        "The draft model that proposes (catalog alias, Hub id or folder); default: prompt lookup, which costs "
        "nothing to run."))] = None,
) -> None:
    """Will MODEL fit DEVICE, with what headroom and speed? Without MODEL: rank what fits."""
    _positive("--context", context)
    _positive("--concurrency", concurrency)
    _positive("--top", top)
    users = parse_count(monthly_users, what="--monthly-users") if monthly_users else None
    dev = resolve_device(device, mem, bandwidth, tflops, kind)
    get_precision("fp16").with_kv_cache(kv_cache_dtype)  # a bad name fails before any work
    if model is None:
        if kv_cache_dtype != "auto":
            raise InvalidParameterError("--kv-cache-dtype plans one model: name it (the ranking plans each at its "
                                        "activations' dtype)")
        precisions = (get_precision(quant).name,) if quant else tuple(PRECISIONS)
        reports = rank_fits(dev, context or 4096, concurrency, precisions)
        if not reports:
            raise InvalidParameterError(f"no catalog model fits {dev.name} at context {context or 4096} x {concurrency}")
        table = Table(title=f"What fits {dev.name} ({dev.usable_bytes / 1e9:,.1f} GB usable), context {context or 4096:,} x {concurrency}")
        for column in ("model", "quant", "memory GB", "headroom GB", "max context", "decode tok/s", "prefill tok/s", "licence"):
            table.add_column(column, justify="left" if column in ("model", "quant", "licence") else "right")
        for report in reports[:top]:
            r = report.request
            table.add_row(r.model.alias, r.precision.name, f"{report.memory.total_bytes / 1e9:,.1f}",
                          f"{report.headroom_bytes / 1e9:,.1f}", f"{report.max_context:,}",
                          f"{report.speed.decode_tok_s:,.1f}", f"{report.speed.prefill_tok_s:,.0f}", r.model.licence)
        console.print(table)
        if len(reports) > top:
            console.print(f"[dim]{len(reports) - top} more fit; use --top to see them[/]")
        return
    if speculative_acceptance is not None and not 0 <= speculative_acceptance <= 1:
        raise InvalidParameterError(f"--speculative-acceptance {speculative_acceptance} must be between 0 and 1")
    _positive("--num-speculative-tokens", num_speculative_tokens)
    spec = resolve_model_spec(model)
    precision, why = (get_precision(quant), None) if quant else _unquantized_precision(spec, dev)
    report = plan_fit(spec, dev, precision.with_kv_cache(kv_cache_dtype), context, concurrency)
    _print_fit(report)
    if why:
        console.print(f"[dim]{why}[/]")
    if speculative_acceptance is not None:
        draft_spec = resolve_model_spec(draft) if draft else None
        r = report.request
        est = estimate_speculative(spec, dev, r.precision, r.context, r.concurrency, speculative_acceptance,
                                   num_speculative_tokens, draft_spec)
        proposer = f"draft {draft_spec.alias}" if draft_spec else "prompt lookup"
        console.print(f"speculative ({proposer}, K={num_speculative_tokens}, acceptance {speculative_acceptance:.2f}): "
                      f"{est.decode_tok_s_per_seq:,.1f} tokens/s per sequence, {est.tokens_per_step:.2f} tokens per "
                      f"step, {est.speedup:.2f}x plain decoding")
    _warn(licence_warnings(spec, users))


def api_comparisons(
    setup: SelfHostSetup, api: list[str] | None, output_share: float, cached_share: float, request_tokens: str,
    month: str | None,
) -> tuple[list[CostComparison], list[str]]:
    """A comparison per priced API (its $/M for a million tokens of this mix over the month), and a line per unpriced one."""
    import datetime as dt

    from selfhost.catalog.prices import default_comparison_ids, load_price_catalog
    from selfhost.plan.pricing import million_token_mix, month_bounds, price_period

    if not 0 <= cached_share <= 1:
        raise InvalidParameterError(f"--cached-share must be in [0, 1], got {cached_share}")
    per_request = parse_count(request_tokens, what="--request-tokens")
    _positive("--request-tokens", per_request)
    start, end = month_bounds(month or dt.date.today().strftime("%Y-%m"))
    catalog = load_price_catalog()
    models = [catalog.get(name) for name in (api or default_comparison_ids())]
    usage = million_token_mix(output_share, cached_share, per_request)
    comparisons, unpriced = [], []
    for model in models:
        period = price_period(usage, model, start, end, catalog)
        if not period.is_priced:
            unpriced.append(f"{model.id}: unpriced ({period.reason}); left out of the comparison")
            continue
        latest = period.latest
        comparisons.append(CostComparison(setup, model.id, float(period.usd), latest.as_of, latest.source.split(": ")[0]))
    if not comparisons:
        raise InvalidParameterError("none of the APIs asked for has a per-token price: " + "; ".join(unpriced))
    return comparisons, unpriced


def cost(
    model: Annotated[str, typer.Argument(
        help="Catalog alias, Hub id (catalog, or config.json in the HF cache) or checkpoint folder.")],
    volume: Annotated[str, typer.Option("--volume", "-v", help="Tokens per month (prompt + output), e.g. 1B.")],
    device: DeviceOpt = "rtx4090",
    quant: QuantOpt = None,
    context: ContextOpt = None,
    concurrency: ConcurrencyOpt = 8,
    output_share: Annotated[float, typer.Option(help="Share of the volume that is generated output.")] = 0.25,
    api: Annotated[list[str] | None, typer.Option(help=(
        "Hosted model(s) to compare, any id `selfhost prices` lists (openai/gpt-5, claude-sonnet-4-5, "
        "groq/llama-3.1-8b-instant); default: a flagship and a cheaper model per big API, Llama 3.1 8B at four hosts."))] = None,
    cached_share: Annotated[float, typer.Option(help="Share of prompt tokens the API reads from its prompt cache.")] = 0.0,
    request_tokens: Annotated[str, typer.Option(help=(
        "Tokens per request (prompt + output): sets per-request fees and long-context tiers."))] = "1000",
    month: Annotated[str | None, typer.Option(help="Price the volume over this month, YYYY-MM; default this month.")] = None,
    years: Annotated[float, typer.Option(help="Years to amortise a purchase over.")] = 3.0,
    electricity: Annotated[float, typer.Option(help="Electricity price, US$ per kWh.")] = 0.15,
    price: Annotated[float | None, typer.Option(help="Override the purchase price, US$.")] = None,
    power: Annotated[float | None, typer.Option(help="Override the power draw, W.")] = None,
    rent: Annotated[float | None, typer.Option(help="Rent instead of buying, US$ per hour.")] = None,
    bench_result: Annotated[Path | None, typer.Option(help="Benchmark JSON with measured output_tok_s, of MODEL.")] = None,
    any_bench_model: Annotated[bool, typer.Option(
        "--any-bench-model", help="Use --bench-result even if it measured another model.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write cost.png and cost.html into this folder.")] = None,
    mem: MemOpt = None,
    bandwidth: BandwidthOpt = None,
    tflops: TflopsOpt = None,
    kind: KindOpt = "gpu",
    monthly_users: UsersOpt = None,
) -> None:
    """Self-hosting MODEL on DEVICE against per-token APIs: $/M tokens, crossover, break-even."""
    tokens = parse_count(volume, what="--volume")
    if tokens < 0:
        raise InvalidParameterError(f"--volume must be >= 0, got {volume}")
    if not 0 <= output_share <= 1:
        raise InvalidParameterError(f"--output-share must be in [0, 1], got {output_share}")
    _positive("--concurrency", concurrency)
    _positive("--context", context)
    users = parse_count(monthly_users, what="--monthly-users") if monthly_users else None
    spec, dev = resolve_model_spec(model), resolve_device(device, mem, bandwidth, tflops, kind)
    precision = get_precision(quant or "int4")
    report = plan_fit(spec, dev, precision, context, concurrency)

    speed = serving_speed(spec, report, precision, bench_result, any_bench_model)
    throughput = speed.mix_tok_s(output_share)
    setup = device_setup(dev, throughput, price_usd=price, rent_usd_per_hour=rent, power_w=power,
                         amortisation_years=years, electricity_usd_per_kwh=electricity)
    comparisons, unpriced = api_comparisons(setup, api, output_share, cached_share, request_tokens, month)

    console.print(f"{spec.alias} ({precision.name}) on {dev.name}: {throughput:,.1f} tokens/s in a "
                  f"{output_share:.0%}-output mix ({speed.source}; decode {speed.decode_tok_s:,.1f}, "
                  f"prefill {speed.prefill_tok_s:,.0f})")
    self_month = setup.monthly_usd(tokens)
    self_per_m = setup.usd_per_m_tokens(tokens)
    console.print(f"self-hosted at {format_count(tokens)} tokens/month: ${self_month:,.2f}/month"
                  + (f", ${self_per_m:,.3f} per million tokens" if self_per_m is not None else "")
                  + f" ({setup.devices_needed(tokens)} device(s), {setup.utilisation(tokens):.0%} busy); "
                  f"best case ${setup.floor_usd_per_m_tokens:,.3f}/M when fully busy")
    table = Table(title=f"Against APIs at {format_count(tokens)} tokens/month")
    for column in HEADERS:
        table.add_column(column, justify="left" if column == "API" else "right")
    for row in comparison_rows(comparisons, tokens):
        table.add_row(*(Text(cell) for cell in format_row(row)))  # Text: API ids print as written
    console.print(table)
    for line in unpriced:
        _warn([line])
    notes = sorted({note for comparison in comparisons for note in comparison.explain(tokens)})
    for note in notes:
        console.print(f"[dim]- {note}[/]", highlight=False)
    _warn(licence_warnings(spec, users))
    if out is not None:
        from selfhost.plan.report import write_report

        dates = ", ".join(sorted({f"{c.price_source} as of {c.price_as_of or 'undated'}" for c in comparisons}))
        png, html, summary = write_report(comparisons, tokens, f"{spec.alias} on {dev.name}", notes, dates, out)
        console.print(f"wrote {png}, {html} and {summary}")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("fit")(fit)
    app.command("cost")(cost)
