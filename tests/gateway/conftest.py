"""Fake upstreams and a gateway built from a TOML config, all on loopback ports."""

from __future__ import annotations

import socket
import textwrap

import pytest

from selfhost.gateway.entrance import GatewayEntrance
from selfhost.server.settings import ServerSettings
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.server.conftest import LoopbackServer

UPSTREAM_KEY = "sk-upstream-SECRET-4242"


@pytest.fixture(scope="module")
def upstreams():
    servers = [FakeUpstream(label).start() for label in ("a", "b", "c")]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _reset(upstreams, monkeypatch):
    for server in upstreams:
        server.mode, server.received = "ok", []
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", UPSTREAM_KEY)


def refused_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def set_entrance(server: LoopbackServer, on: bool) -> LoopbackServer:
    """The server's app with (on) or without the lean entrance in front (before it starts)."""
    app = server.app
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GatewayEntrance]
    if on:
        app.add_middleware(GatewayEntrance, gateway=app.state.gateway)
    return server


@pytest.fixture(params=["full-stack", "entrance"])
def gateway(tmp_path, request):
    """gateway(toml) -> a started LoopbackServer serving that config; stopped at the test's end.

    Every test runs twice: through FastAPI's whole middleware stack and through the lean entrance."""
    started = []

    def start(toml: str, timeout_s: float = 1.0, ledger: str | None = None, **settings) -> LoopbackServer:
        # 1 s makes the hang/stall tests quick; tests that hold many slow requests in flight on a
        # loaded CI machine pass a longer one (a 1 s limit once failed 6 of 32 there).
        config = tmp_path / "selfhost.toml"
        ledger = ledger or f"sqlite:///{tmp_path / 'ledger.db'}"
        config.write_text(f'[gateway]\nledger = "{ledger}"\ntimeout_s = {timeout_s}\nbackoff_s = 0\n'
                          + textwrap.dedent(toml))
        server = LoopbackServer(ServerSettings(config=config, responses_db=tmp_path / "r.db", **settings))
        started.append(set_entrance(server, request.param == "entrance").start())
        return server

    yield start
    for server in started:
        server.stop()


def remote(name: str, url: str, model: str = "gpt-4o-mini", **extra) -> str:
    """A [[models]] entry for a remote deployment."""
    lines = [f'name = "{name}"', f'url = "{url}"', f'model = "{model}"', 'api_key_env = "FAKE_UPSTREAM_KEY"']
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, list) else
                     f"{key} = [{', '.join(repr(v) for v in value)}]")
    return "\n[[models]]\n" + "\n".join(lines).replace("'", '"') + "\n"
