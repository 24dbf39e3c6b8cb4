"""One local Ray instance (127.0.0.1, 2 CPUs) for the cluster tests, and an app deployed on it per module."""

from __future__ import annotations

import os
import socket
import time

import pytest


@pytest.fixture(scope="session")
def ray_instance():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", logging_level="warning")
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_model(tmp_path_factory):
    """The tiny Llama with room for a 512-token shared prefix plus a question."""
    from tests.tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("cluster-llama"), max_position_embeddings=1024)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeApp:
    """An app of selfhost.cluster.app on the session's Ray, over Serve's proxy at `url`."""

    def __init__(self, model_dir, cluster, **server):
        from ray import serve

        from selfhost.cluster.launch import app_args
        from selfhost.server.settings import ServerSettings

        self.cluster = cluster
        self.port = free_port()
        settings = ServerSettings(models=[f"tiny={model_dir}"], port=self.port, weight_dtype="float32",
                                  kv_cache_memory="32MiB", log_level="warning", **server)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        from selfhost.cluster.app import build_app

        serve.run(build_app(app_args(settings, cluster)), name=cluster.app_name, route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"

    def replicas(self) -> dict[str, dict]:
        """The StatsBoard's snapshot: replica id -> its latest stats."""
        from ray import serve

        return serve.get_deployment_handle("StatsBoard", self.cluster.app_name).snapshot.remote().result()

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications[self.cluster.app_name]
        return app.deployments["EngineReplica"].replica_states.get("RUNNING", 0)

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def close(self) -> None:
        from ray import serve

        serve.delete(self.cluster.app_name)
        # Serve keeps one HTTP proxy per node; the next app in this session starts it on its own port.
        serve.shutdown()


os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
