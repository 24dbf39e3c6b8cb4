"""`selfhost prices`: the hosted-API prices selfhost knows, where they come from, how old they are."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.table import Table

from selfhost.cli.console import make_console
from selfhost.errors import InvalidParameterError, SelfhostError

# Model ids are printed as written: `...:free` is not an emoji code, `[...]` not markup.
console = make_console(emoji=False, markup=False)

# genai-prices is released about monthly; three months without an update means the
# package (or the override) is no longer being refreshed.
DEFAULT_MAX_AGE_DAYS = 90


class StalePricesError(SelfhostError):
    """`selfhost prices --check` found prices older than the threshold."""


def _parse_day(value: str | None, what: str) -> dt.date:
    if value is None:
        return dt.date.today()
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidParameterError(f"{what} must be YYYY-MM-DD, got {value!r}") from exc


def _usd(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def price_row(model, when: dt.datetime) -> dict:
    """One model's rates on `when`, with dates and source, as the JSON output spells them."""
    rates = model.rates(when)
    since, following = model.since(when), model.next_change(when)
    return {
        "id": model.id, "provider": model.provider, "model": model.model,
        "input_usd_per_m": rates.input_usd_per_m, "cached_input_usd_per_m": rates.cached_input_usd_per_m,
        "cache_write_usd_per_m": rates.cache_write_usd_per_m, "output_usd_per_m": rates.output_usd_per_m,
        "usd_per_request": rates.usd_per_request, "long_context_from_tokens": rates.long_context_from_tokens,
        "long_context_input_usd_per_m": rates.long_context_input_usd_per_m,
        "long_context_output_usd_per_m": rates.long_context_output_usd_per_m,
        "since": since.isoformat() if since else None, "next_change": following.isoformat() if following else None,
        "as_of": model.as_of.isoformat() if model.as_of else None, "source": model.source,
        "override": model.is_override, "deprecated": model.deprecated,
    }


def _long_context(row: dict) -> str:
    if row["long_context_from_tokens"] is None:
        return ""
    return (f">{row['long_context_from_tokens']:,}: in {_usd(row['long_context_input_usd_per_m'])}, "
            f"out {_usd(row['long_context_output_usd_per_m'])}")


def _print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("id", "model", "input $/M", "cached $/M", "output $/M", "$/request", "long context $/M",
                   "since", "as of", "source"):
        table.add_column(column, justify="right" if "$" in column and "long" not in column else "left")
    for row in rows:
        name = row["model"] + (" (deprecated)" if row["deprecated"] else "")
        changes = f" (changes {row['next_change']})" if row["next_change"] else ""
        table.add_row(row["id"], name, _usd(row["input_usd_per_m"]), _usd(row["cached_input_usd_per_m"]),
                      _usd(row["output_usd_per_m"]), _usd(row["usd_per_request"], 4), _long_context(row),
                      (row["since"] or "") + changes, row["as_of"] or "undated", row["source"])
    console.print(table)


def _check(models, today: dt.date, max_age_days: int) -> None:
    """One line per source date: how many entries it dates, how old it is."""
    groups: dict[tuple, list] = {}
    for model in models:
        # Every entry of a snapshot shares its date and label; overrides stand alone.
        key = (model.as_of, model.id if model.is_override else model.source.split(": ")[0])
        groups.setdefault(key, []).append(model)
    table = Table(title=f"API prices older than {max_age_days} days on {today}")
    for column in ("source", "entries", "as of", "age (days)", "status"):
        table.add_column(column, justify="right" if column in ("entries", "age (days)") else "left")
    stale = 0
    for (as_of, label), members in sorted(groups.items(), key=lambda item: (item[0][0] or dt.date.min, item[0][1])):
        age = (today - as_of).days if as_of else None
        is_stale = age is None or age > max_age_days
        stale += len(members) if is_stale else 0
        table.add_row(label, f"{len(members):,}", str(as_of) if as_of else "undated",
                      "-" if age is None else f"{age:,}", "STALE" if is_stale else "ok")
    console.print(table)
    if stale:
        raise StalePricesError(f"{stale:,} API price entries are older than {max_age_days} days or undated; "
                               "run `selfhost prices --update` or upgrade genai-prices")
    console.print(f"all {len(models):,} entries are at most {max_age_days} days old")


def prices(
    provider: Annotated[str | None, typer.Option(help="Provider id or name part, e.g. openai, groq, together.")] = None,
    model: Annotated[str | None, typer.Option(help="Model id or name part, e.g. gpt-5, llama-3.1-8b.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout instead of a table.")] = False,
    on: Annotated[str | None, typer.Option(help="Show the prices in force on this day, YYYY-MM-DD; default today.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Report entries older than --max-age-days; exit 1 if any.")] = False,
    max_age_days: Annotated[int, typer.Option(help="Age beyond which --check calls a price stale.")] = DEFAULT_MAX_AGE_DAYS,
    update: Annotated[bool, typer.Option("--update", help=(
        "Fetch genai-prices' newest data (network) into the cache folder; otherwise nothing is fetched."))] = False,
) -> None:
    """List hosted-API prices with their dates and sources (genai-prices plus selfhost's overrides)."""
    from selfhost.catalog.price_source import cache_path, fetch_snapshot
    from selfhost.catalog.prices import at_pricing_time, load_price_catalog

    if max_age_days < 0:
        raise InvalidParameterError(f"--max-age-days must be >= 0, got {max_age_days}")
    day = _parse_day(on, "--on")
    if update:
        snapshot = fetch_snapshot()
        load_price_catalog.cache_clear()
        count = sum(len(p.models) for p in snapshot.providers)
        console.print(f"fetched {count:,} models from {len(snapshot.providers)} providers "
                      f"({snapshot.label}) into {cache_path()}")
    catalog = load_price_catalog()
    models = catalog.models()
    if provider:
        part = provider.lower()
        models = [m for m in models if part in m.id.split("/", 1)[0] or part in m.provider.lower()]
    if model:
        part = model.lower()
        models = [m for m in models if part in m.id.split("/", 1)[1].lower() or part in m.model.lower()]
    if not models:
        raise InvalidParameterError(
            f"no API price matches --provider {provider!r} --model {model!r}; try a shorter part of the name")
    if check:
        _check(models, day, max_age_days)
        return
    if update and not (provider or model or as_json):
        return  # the update was the point; listing every model after it would bury the line above
    when = at_pricing_time(day)
    rows = [price_row(m, when) for m in models]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    _print_table(rows, f"API prices in US$ on {day} ({catalog.snapshot.label}, plus selfhost's overrides)")


def register(app: typer.Typer) -> None:
    app.command("prices")(prices)
