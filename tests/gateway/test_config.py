"""Start-up validation: every bad config is one clear error, before anything is served."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfhost.gateway.config import (
    GatewayConfigError,
    load_gateway_config,
    parse_gateway_config,
)
from selfhost.gateway.deployments import DeploymentTable

REMOTE = {"name": "gpt", "url": "http://127.0.0.1:1/v1", "model": "gpt-4o-mini"}


def parse(*models, **gateway):
    return parse_gateway_config({"models": list(models), **({"gateway": gateway} if gateway else {})})


@pytest.mark.parametrize("entry, message", [
    ({**REMOTE, "type": "grpc"}, "unknown backend type 'grpc'; expected one of local, openai"),
    ({"name": "x"}, "needs either `path`"),
    ({**REMOTE, "path": "/m"}, "has both `path` and `url`"),
    ({"name": "gpt", "url": "http://h/v1"}, "needs `url` and `model`"),
    ({**REMOTE, "url": "ftp://h"}, "must start with http://"),
    ({**REMOTE, "wieght": 2}, "wieght: Extra inputs are not permitted"),
    ({**REMOTE, "weight": 0}, "weight: Input should be greater than 0"),
    ({"name": "x", "path": "/m", "cost": {"rent_usd_per_hour": 1.0}}, "without `device`, the cost needs"),
    ({"name": "x", "path": "/m", "cost": {"device": "rtx4090", "throughput_tok_s": 5, "bench_result": "b.json"}},
     "`throughput_tok_s` or `bench_result`, not both"),
    ({"name": "x", "path": "/m", "cost": {"device": "rtx4090", "price_usd": 1, "rent_usd_per_hour": 1}},
     "not both"),
    ({"name": "x", "path": "/m", "cost": {"devcie": "rtx4090"}}, "cost.devcie: Extra inputs are not permitted"),
    ({**REMOTE, "cost": {"device": "rtx4090"}}, "`cost` prices local models"),
])
def test_bad_entries_name_the_entry_and_the_problem(entry, message):
    with pytest.raises(GatewayConfigError, match="models\\]\\] #1 \\('") as err:
        parse(entry)
    assert message in str(err.value)


def test_missing_api_key_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(GatewayConfigError, match="api_key_env 'NO_SUCH_KEY_VAR' is not set"):
        parse({**REMOTE, "api_key_env": "NO_SUCH_KEY_VAR"})


def test_fallback_to_an_unknown_model():
    with pytest.raises(GatewayConfigError, match="fallback 'gtp' names no model in the config \\(models: gpt\\)"):
        parse({**REMOTE, "fallbacks": ["gtp"]})


def test_duplicate_deployment_ids_and_shared_local_names():
    with pytest.raises(GatewayConfigError, match="deployment id 'east' is used by 2 entries"):
        parse({**REMOTE, "deployment": "east"}, {**REMOTE, "deployment": "east"})
    with pytest.raises(GatewayConfigError, match="local model cannot share its name"):
        parse({"name": "gpt", "path": "/m"}, REMOTE)


def test_unknown_gateway_setting():
    with pytest.raises(GatewayConfigError, match="gateway.retries: Extra inputs are not permitted"):
        parse(REMOTE, retries=3)


def test_file_errors(tmp_path):
    with pytest.raises(GatewayConfigError, match="does not exist"):
        load_gateway_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]\n")
    with pytest.raises(GatewayConfigError, match="is not valid TOML"):
        load_gateway_config(bad)


def test_plan_orders_deployments_then_fallbacks_breadth_first_each_once():
    config = parse({**REMOTE, "fallbacks": ["b", "local"]}, {**REMOTE, "deployment": "gpt-2"},
                   {**REMOTE, "name": "b", "fallbacks": ["gpt", "c"]}, {**REMOTE, "name": "c"},
                   {"name": "local", "path": "/m"})
    order, local = DeploymentTable(config).plan("gpt")
    assert [d.id for d in order] == ["gpt/0", "gpt-2", "b/0", "c/0"]
    assert local == "local"


def test_cli_prints_one_line_and_exits_1(tmp_path):
    config = tmp_path / "selfhost.toml"
    config.write_text('[[models]]\nname = "gpt"\nurl = "http://h/v1"\nmodel = "m"\nfallbacks = ["nope"]\n')
    result = subprocess.run([sys.executable, "-m", "selfhost.cli", "serve", "--config", str(config), "--port", "0"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: model 'gpt': fallback 'nope' names no model in the config (models: gpt)"]
