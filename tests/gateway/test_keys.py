"""Virtual keys: budgets reserved at admission and settled on completion, model lists, revocation, the CLI."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest
from typer.testing import CliRunner

from selfhost.cli.main import _register_commands, app
from selfhost.gateway.budgets import estimate_cost
from selfhost.gateway.config import ModelEntry
from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.spend import spend_by
from selfhost.gateway.what_if import what_if
from tests.gateway.conftest import remote
from tests.gateway.test_cost import HAND_PRICE_USD

CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


def post(server, key: str | None, body=CHAT) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def test_budget_refuses_with_insufficient_quota_before_any_upstream_call(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    key = server.app.state.gateway.keys.create("team-a", budget_usd=Decimal("0.0004"))
    assert [post(server, key).status_code for _ in range(2)] == [200, 200]
    refused = post(server, key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota" and "team-a" in refused.json()["error"]["message"]
    assert len(upstreams[0].received) == 2
    rows = server.app.state.gateway.ledger.rows()
    assert [r["key_name"] for r in rows] == ["team-a", "team-a"]
    assert post(server, None).status_code == 200  # no virtual key: unmetered (require_key is off)


def test_concurrent_requests_reserve_their_estimates(gateway, upstreams):
    upstreams[0].mode = "slow"  # all 32 are in flight together
    server = gateway(remote("gpt", upstreams[0].url), timeout_s=10.0)
    budget = Decimal("0.001")
    key = server.app.state.gateway.keys.create("team-b", budget_usd=budget)
    estimate = estimate_cost(CHAT, Pricer("gpt-4o-mini"), dt.datetime.now(dt.UTC))
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda _: post(server, key).status_code, range(32)))
    admitted = statuses.count(200)
    # Without reservations every request would pass (nothing is spent when they arrive).
    assert admitted == int(budget / estimate) and statuses.count(429) == 32 - admitted, statuses
    spent = sum(Decimal(r["cost_usd"]) for r in server.app.state.gateway.ledger.rows())
    assert spent == admitted * HAND_PRICE_USD
    assert spent - budget < admitted * HAND_PRICE_USD  # the overshoot is bounded by what was admitted


def test_model_list_revocation_and_required_keys(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url) + remote("other", upstreams[1].url))
    keys = server.app.state.gateway.keys
    key = keys.create("team-c", models=("gpt",))
    assert post(server, key).status_code == 200
    forbidden = post(server, key, {**CHAT, "model": "other"})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "model_not_allowed"
    assert post(server, "sk-selfhost-not-a-key").status_code == 401
    keys.revoke("team-c")
    server.app.state.gateway.admission._cache.clear()  # a running server notices within KEY_CACHE_S
    assert post(server, key).json()["error"]["code"] == "invalid_api_key"


def test_rate_limits_per_minute(gateway, upstreams):
    server = gateway(remote("gpt", upstreams[0].url))
    keys = server.app.state.gateway.keys
    by_requests = keys.create("rpm-2", rpm=2)
    assert [post(server, by_requests).status_code for _ in range(3)] == [200, 200, 429]
    refused = post(server, by_requests).json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and "limit 2 a minute" in refused["message"]
    # 300 tokens a minute: the first request reserves ~260 (prompt + 256 default output), then really
    # uses 1080 (the fake upstream's usage), so the next is refused before any upstream call.
    by_tokens = keys.create("tpm-300", tpm=300)
    assert post(server, by_tokens).status_code == 200
    assert post(server, by_tokens).json()["error"]["code"] == "rate_limit_exceeded"
    assert len(upstreams[0].received) == 3


def test_require_key(upstreams, gateway):
    server = gateway("require_key = true\n" + remote("gpt", upstreams[0].url))
    assert post(server, None).status_code == 401
    key = server.app.state.gateway.keys.create("team-d")
    assert post(server, key).status_code == 200


@pytest.fixture
def cli():
    if not any(getattr(g, "name", None) == "keys" for g in app.registered_groups):
        _register_commands()
    return CliRunner()


def test_keys_and_spend_commands(cli, tmp_path):
    config = tmp_path / "selfhost.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{tmp_path / "l.db"}"\n'
                      '[[models]]\nname = "gpt"\nurl = "http://h/v1"\nmodel = "gpt-4o-mini"\napi_key_env = "UNSET_X"\n')
    created = cli.invoke(app, ["keys", "create", "--name", "team-a", "--budget-usd", "50", "--models", "gpt",
                               "--rpm", "600", "--tpm", "200000", "--config", str(config)])
    assert created.exit_code == 0, created.output
    assert created.output.strip().startswith("sk-selfhost-")
    again = cli.invoke(app, ["keys", "create", "--name", "team-a", "--config", str(config)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    listed = cli.invoke(app, ["keys", "list", "--config", str(config)])
    assert "team-a" in listed.output and "$50/month" in listed.output
    assert created.output.strip() not in listed.output  # the key itself is shown once only
    shown = cli.invoke(app, ["keys", "show", "team-a", "--config", str(config)])
    assert "spent this period: $0" in shown.output and "600 requests, 200000 tokens a minute" in shown.output
    assert cli.invoke(app, ["keys", "revoke", "team-a", "--config", str(config)]).exit_code == 0
    assert "revoked" in cli.invoke(app, ["keys", "list", "--config", str(config)]).output
    spend = cli.invoke(app, ["spend", "--by", "key", "--config", str(config)])
    assert spend.exit_code == 0 and "unpriced requests" in spend.output


def test_what_if_reprices_the_traffic(gateway, upstreams, cli, tmp_path):
    server = gateway(remote("gpt", upstreams[0].url, model="house-7b"))
    for _ in range(2):
        post(server, None)
    local = ModelEntry(name="qwen", path="/m", cost={"rent_usd_per_hour": 0.36, "throughput_tok_s": 100})
    scenarios, requests, days = what_if(server.app.state.gateway.ledger, "gpt-4o-mini", local)
    by_label = {s.label: s for s in scenarios}
    assert requests == 2 and days == 1.0
    assert by_label["as recorded"].unpriced_requests == 2  # house-7b has no price
    assert by_label["all through gpt-4o-mini"].usd == 2 * HAND_PRICE_USD
    # On the local model the 200 prompt tokens the API read from its cache would come from the prefix cache: free.
    assert by_label["all on local qwen"].usd == 2 * (1080 - 200) * Decimal("0.36") / (100 * 3600)
    assert by_label["all through gpt-4o-mini"].monthly_usd == (60 * HAND_PRICE_USD).quantize(Decimal("0.01"))
    # The command: the same ledger, named by a config that also has a priced local model.
    config = tmp_path / "what-if.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{tmp_path / "ledger.db"}"\n'
                      + remote("gpt", upstreams[0].url, model="house-7b")
                      + '[[models]]\nname = "qwen"\npath = "/m"\n[models.cost]\nrent_usd_per_hour = 0.36\n'
                      + 'throughput_tok_s = 100\n')
    result = cli.invoke(app, ["spend", "--what-if", "--api", "gpt-4o-mini", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "all through gpt-4o-mini" in result.output and "all on local qwen" in result.output
    bad = cli.invoke(app, ["spend", "--what-if", "--local", "nope", "--config", str(config)])
    assert bad.exit_code != 0 and "is not a local model" in str(bad.exception)


def test_spend_groups_the_ledger(gateway, upstreams, cli, tmp_path):
    server = gateway(remote("gpt", upstreams[0].url) + remote("house", upstreams[1].url, model="house-7b"))
    key = server.app.state.gateway.keys.create("team-e")
    post(server, key)
    post(server, None, {**CHAT, "model": "house"})
    by_key = {r.group: r for r in spend_by(server.app.state.gateway.ledger, "key")}
    assert by_key["team-e"].cost_usd == HAND_PRICE_USD and by_key["(no key)"].unpriced_requests == 1
    by_model = {r.group: r for r in spend_by(server.app.state.gateway.ledger, "model")}
    assert by_model["gpt"].output_tokens == 80 and by_model["house"].cost_usd == 0
    config = tmp_path / "spend.toml"
    config.write_text(f'[gateway]\nledger = "sqlite:///{tmp_path / "ledger.db"}"\n')
    written = cli.invoke(app, ["spend", "--by", "model", "--out", str(tmp_path / "report"), "--config", str(config)])
    assert written.exit_code == 0, written.output
    csv_text = (tmp_path / "report" / "spend_by_model.csv").read_text().splitlines()
    assert csv_text[0].startswith("model,requests") and csv_text[1] == f"gpt,1,1000,80,{HAND_PRICE_USD},0"
    assert (tmp_path / "report" / "spend_by_model.png").read_bytes()[:4] == b"\x89PNG"
    metrics = httpx.get(server.url + "/metrics").text
    assert f'selfhost_gateway_spend_usd_total{{key="team-e",model="gpt"}} {float(HAND_PRICE_USD)}' in metrics
    assert 'selfhost_gateway_unpriced_requests_total{key="none",model="house"} 1.0' in metrics


def test_admin_api_behind_the_master_key(gateway, upstreams, monkeypatch):
    monkeypatch.setenv("SELFHOST_MASTER_KEY", "master-123")
    server = gateway(remote("gpt", upstreams[0].url), api_key=["static-key"])  # the admin API has its own key
    admin = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer master-123"}, timeout=10)
    assert httpx.get(server.url + "/admin/keys", headers={"Authorization": "Bearer static-key"}).status_code == 401
    created = admin.post("/admin/keys", json={"name": "team-f", "budget_usd": "5", "rpm": 60, "models": ["gpt"]})
    assert created.status_code == 201 and created.json()["key"].startswith("sk-selfhost-")
    assert admin.post("/admin/keys", json={"name": "team-f"}).json()["error"]["code"] == "key_exists"
    assert admin.post("/admin/keys", json={"name": "x", "period": "year"}).status_code == 400
    assert admin.post("/admin/keys", json={"name": "x", "nam": "y"}).json()["error"]["param"] == "nam"
    listed = admin.get("/admin/keys").json()["data"]
    assert [k["name"] for k in listed] == ["team-f"] and "key" not in listed[0]
    assert admin.get("/admin/keys/team-f").json()["spent_usd"] == "0"
    assert admin.get("/admin/keys/nobody").status_code == 404
    assert admin.delete("/admin/keys/team-f").json()["revoked"] is True
    assert admin.get("/admin/spend", params={"by": "key"}).json() == {"data": []}
    assert admin.get("/admin/spend", params={"by": "colour"}).status_code == 400
    # The API itself keeps --api-key's check, remote models included...
    assert post(server, None).status_code == 401 and len(upstreams[0].received) == 0
    assert post(server, "static-key").status_code == 200
    # ...and takes virtual keys beside it, checked by the gateway; nothing else gets past with one.
    virtual = admin.post("/admin/keys", json={"name": "team-g"}).json()["key"]
    assert post(server, virtual).status_code == 200
    assert server.app.state.gateway.ledger.rows()[-1]["key_name"] == "team-g"
    bogus = "sk-selfhost-bogus"
    assert post(server, bogus).json()["error"]["code"] == "invalid_api_key"
    malformed = httpx.post(server.url + "/v1/chat/completions", content=b"{", headers={"Authorization": f"Bearer {bogus}"})
    assert malformed.status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {virtual}"}).status_code == 401
