"""`selfhost keys create|list|show|revoke` and `selfhost spend`: the gateway's virtual keys and its ledger.

Both read the ledger named by the same `--config` file as `selfhost serve`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer

from selfhost.cli.console import make_console
from selfhost.errors import InvalidParameterError

keys_app = typer.Typer(help="Virtual keys for the gateway: budgets and model lists per client.", no_args_is_help=True)

ConfigOption = typer.Option(..., "--config", help="The gateway config (TOML) whose ledger holds the keys.")
OutOption = typer.Option(None, "--out", help="Also write the table (CSV) and a bar chart (PNG) to this folder.")


def _ledger(config: Path):
    from selfhost.gateway.config import load_gateway_config
    from selfhost.gateway.ledger import Ledger

    return Ledger(load_gateway_config(config, check_env=False).gateway.ledger)


def _store(config: Path):
    from selfhost.gateway.keys import KeyStore

    return KeyStore(_ledger(config).engine)


@keys_app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="A name for the key's owner, e.g. team-a."),
    budget_usd: str = typer.Option(None, "--budget-usd", help="Most dollars the key may spend per period."),
    period: str = typer.Option("month", "--period", help="Budget period: day, month or total."),
    models: str = typer.Option(None, "--models", help="Comma list of the models the key may call (default: all)."),
    rpm: int = typer.Option(None, "--rpm", help="Most requests a minute (default: no limit)."),
    tpm: int = typer.Option(None, "--tpm", help="Most tokens a minute, prompt and generated (default: no limit)."),
    config: Path = ConfigOption,
) -> None:
    """Create a key and print it: the only time it is shown."""
    from selfhost.gateway.keys import parse_budget

    allowed = tuple(m.strip() for m in models.split(",") if m.strip()) if models else None
    key = _store(config).create(name, parse_budget(budget_usd), period, allowed, rpm, tpm)
    print(key)


@keys_app.command("list")
def list_keys(config: Path = ConfigOption) -> None:
    """Every key: name, prefix, budget, models, state."""
    from rich.table import Table

    table = Table("name", "key", "budget", "rpm", "tpm", "models", "state")
    for key in _store(config).all():
        budget = f"${key.budget_usd}/{key.period}" if key.budget_usd is not None else "none"
        state = "active" if key.is_active else f"revoked {key.revoked_at:%Y-%m-%d}"
        table.add_row(key.name, key.shown_prefix + "...", budget, str(key.rpm or "-"), str(key.tpm or "-"),
                      ",".join(key.models or ["all"]), state)
    make_console().print(table)


@keys_app.command("show")
def show(name: str = typer.Argument(..., help="The key's name."), config: Path = ConfigOption) -> None:
    """One key and what it has spent this period."""
    from selfhost.gateway.budgets import KeyBudgets
    from selfhost.gateway.keys import KeyStore

    ledger = _ledger(config)
    key = KeyStore(ledger.engine).get(name)
    spent = KeyBudgets(ledger).spent(key, dt.datetime.now(dt.UTC))
    budget = f"${key.budget_usd} per {key.period}" if key.budget_usd is not None else "none"
    print(f"name: {key.name}\nkey: {key.shown_prefix}...\nbudget: {budget}\nspent this period: ${spent}\n"
          f"rate limits: {key.rpm or 'no'} requests, {key.tpm or 'no'} tokens a minute\n"
          f"models: {','.join(key.models or ['all'])}\ncreated: {key.created_at:%Y-%m-%d %H:%M} UTC\n"
          f"state: {'active' if key.is_active else 'revoked'}")


@keys_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The key's name."), config: Path = ConfigOption) -> None:
    """Revoke a key: its requests are refused (within two seconds on a running server)."""
    _store(config).revoke(name)
    print(f"revoked {name}")


def spend(
    by: str = typer.Option("model", "--by", help="Group by key, model or day."),
    since: str = typer.Option(None, "--since", help="Only requests from this day on (YYYY-MM-DD)."),
    what_if: bool = typer.Option(False, "--what-if", help="Reprice the traffic all through an API and all local: "
                                 "the monthly cost of each."),
    api: str = typer.Option(None, "--api", help="--what-if: the API model (default: the first remote's)."),
    local: str = typer.Option(None, "--local", help="--what-if: the local model (default: the first priced one)."),
    out: Path = OutOption,
    config: Path = ConfigOption,
) -> None:
    """What the gateway's requests cost, from its ledger."""
    from rich.table import Table

    from selfhost.gateway.spend import spend_by

    try:
        since_day = dt.date.fromisoformat(since) if since else None
    except ValueError:
        raise InvalidParameterError(f"--since must be YYYY-MM-DD, got {since!r}") from None
    if what_if:
        return _what_if(config, since_day, api, local)
    rows = spend_by(_ledger(config), by, since_day)
    table = Table(by, "requests", "input tokens", "output tokens", "cost (USD)", "unpriced requests")
    for row in rows:
        table.add_row(row.group, str(row.requests), str(row.input_tokens), str(row.output_tokens),
                      f"{row.cost_usd:.6f}", str(row.unpriced_requests))
    make_console().print(table)
    if out is not None:
        from selfhost.gateway.spend_report import write_spend_report

        for path in write_spend_report(rows, by, out):
            print(f"wrote {path}")


def _what_if(config_path: Path, since: dt.date | None, api: str | None, local: str | None) -> None:
    from rich.table import Table

    from selfhost.gateway.config import load_gateway_config
    from selfhost.gateway.ledger import Ledger
    from selfhost.gateway.what_if import what_if

    config = load_gateway_config(config_path, check_env=False)
    priced_locals = [e for e in config.local_entries if e.cost is not None]
    if local is not None:
        matches = [e for e in priced_locals if e.name == local]
        if not matches:
            raise InvalidParameterError(f"--local {local!r} is not a local model with a [models.cost] "
                                        f"in {config_path} (priced: "
                                        f"{', '.join(e.name for e in priced_locals) or 'none'})")
        local_entry = matches[0]
    else:
        local_entry = priced_locals[0] if priced_locals else None
    api = api or next((e.price_model or e.model for e in config.remote_entries), None)
    scenarios, requests, days = what_if(Ledger(config.gateway.ledger), api, local_entry, since)
    if not scenarios:
        print("the ledger has no requests yet")
        return
    table = Table("routing", "cost (USD)", "per 30 days (USD)", "unpriced requests",
                  title=f"{requests} requests over {days:.1f} day(s)")
    for s in scenarios:
        table.add_row(s.label, f"{s.usd:.6f}", f"{s.monthly_usd}", str(s.unpriced_requests))
    make_console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("spend")(spend)
