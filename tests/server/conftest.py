"""A real selfhost server on a loopback port, serving the tiny Llama checkpoint as "tiny"."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from selfhost.server.app import create_app
from selfhost.server.settings import ServerSettings

MODEL = "tiny"


class LoopbackServer:
    """uvicorn in a daemon thread on a free 127.0.0.1 port; `app` is reachable for white-box checks."""

    def __init__(self, settings: ServerSettings):
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def settings(self) -> ServerSettings:
        return self.app.state.settings

    def start(self, timeout_s: float = 120) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def engine_stats(self, model: str = MODEL):
        return self.app.state.models.models[model].engine.stats()

    def wait_idle(self, model: str = MODEL, timeout_s: float = 30):
        """Engine stats once nothing runs or waits (requests abort at the next step boundary)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine_stats(model)
            if (stats.num_running == 0 and stats.num_waiting == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


def start_long_context_server(tmp_path_factory, **settings) -> LoopbackServer:
    """The tiny Llama with a 4k context, serving as MODEL: tool definitions and schemas take hundreds of
    its byte-level tokens. `settings` add to (or override) ServerSettings'."""
    from tests.tiny_models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama-4k"), max_position_embeddings=4096)
    defaults = dict(models=[f"{MODEL}={checkpoint}"], kv_cache_memory="64MiB", weight_dtype="float32",
                    rag_store=tmp_path_factory.mktemp("rag-store"),
                    responses_db=tmp_path_factory.mktemp("responses") / "responses.db")
    return LoopbackServer(ServerSettings(**{**defaults, **settings})).start()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    settings = ServerSettings(
        models=[f"{MODEL}={tiny_checkpoint('llama')}"], kv_cache_memory="64MiB", max_n=4, keep_alive_s=1.0,
        # The weights as loaded (not the CLI's "auto"): tests compare the server with the offline engine.
        weight_dtype="float32",
        rag_store=tmp_path_factory.mktemp("rag-store"),  # requests naming a collection never touch ~/.local
        responses_db=tmp_path_factory.mktemp("responses") / "responses.db",
    )
    srv = LoopbackServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
