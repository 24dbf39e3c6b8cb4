"""The gateway on a PostgreSQL ledger (a real server: tests/gateway/postgres.py): virtual keys, budgets, spend
and the commands that read them, as on SQLite. The ledger's own tests and the kill -9 test run on both."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from selfhost.cli.main import app
from selfhost.gateway.config import GatewayConfigError
from selfhost.gateway.ledger import Ledger
from selfhost.gateway.spend import spend_by
from tests.gateway.conftest import remote
from tests.gateway.test_cost import HAND_PRICE_USD
from tests.gateway.test_keys import cli, post  # noqa: F401 - cli is a fixture


def test_keys_budgets_and_spend_on_postgresql(gateway, upstreams, postgres_url, cli, tmp_path):  # noqa: F811
    server = gateway(remote("gpt", upstreams[0].url), ledger=postgres_url)
    ledger = server.app.state.gateway.ledger
    assert ledger.engine.dialect.name == "postgresql"
    key = server.app.state.gateway.keys.create("team-a", budget_usd=Decimal("0.0004"))
    assert [post(server, key).status_code for _ in range(2)] == [200, 200]
    refused = post(server, key)  # the two recorded requests' spend, read back from PostgreSQL, fills the budget
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert post(server, None).status_code == 200
    by_key = {r.group: r for r in spend_by(ledger, "key")}
    assert by_key["team-a"].requests == 2 and by_key["team-a"].cost_usd == 2 * HAND_PRICE_USD
    assert by_key["(no key)"].requests == 1
    assert [r.group for r in spend_by(ledger, "day")] == [dt.datetime.now(dt.UTC).date().isoformat()]
    # The commands find the same database through a config naming it.
    config = tmp_path / "pg.toml"
    config.write_text(f'[gateway]\nledger = "{postgres_url}"\n')
    listed = cli.invoke(app, ["keys", "list", "--config", str(config)])
    assert listed.exit_code == 0 and "team-a" in listed.output
    spend = cli.invoke(app, ["spend", "--by", "key", "--config", str(config)])
    assert spend.exit_code == 0 and "team-a" in spend.output and "(no key)" in spend.output


def test_a_postgresql_url_without_the_driver_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_psycopg(name, *args, **kwargs):
        if name == "psycopg":
            raise ImportError("no psycopg")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_psycopg)
    with pytest.raises(GatewayConfigError, match=r"pip install 'selfhost\[postgres\]'"):
        Ledger("postgresql://ledger@db.example/selfhost")
