"""`selfhost serve`: flags generated from ServerSettings, environment fallback, CLI wins."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from selfhost.cli import serve as serve_cmd
from selfhost.cli.main import _register_commands, app
from selfhost.server.settings import ServerSettings


@pytest.fixture
def captured(monkeypatch):
    seen = {}
    monkeypatch.setattr(serve_cmd, "run_server", lambda settings: seen.setdefault("settings", settings))
    if not any(c.name == "serve" for c in app.registered_commands):
        _register_commands()
    return seen


def test_every_setting_has_a_flag(captured):
    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for name in ServerSettings.model_fields:
        if name != "models":
            assert "--" + name.replace("_", "-") in out, name


def test_flags_override_environment(captured, monkeypatch):
    monkeypatch.setenv("SELFHOST_PORT", "9001")
    monkeypatch.setenv("SELFHOST_API_KEY", "k1,k2")
    result = CliRunner().invoke(app, ["serve", "a=/x", "b", "--allow-load", "--max-n", "3", "--cors", "*"])
    assert result.exit_code == 0, result.output
    s = captured["settings"]
    assert s.models == ["a=/x", "b"] and s.allow_load and s.max_n == 3 and s.cors == ["*"]
    assert s.port == 9001 and s.api_key == ["k1", "k2"]  # from the environment
    assert s.host == "127.0.0.1"  # default


def test_bad_memory_value_is_rejected():
    with pytest.raises(ValueError, match="kv_cache_memory"):
        ServerSettings(kv_cache_memory="lots")
