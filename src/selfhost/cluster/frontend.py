"""Frontend: the Ray Serve ingress, which is selfhost's own HTTP app over the engine replicas.

`create_app(settings)` builds the very app `selfhost serve` runs (OpenAI,
Ollama, Anthropic routes, the chat page, /metrics); its model registry is given
one seam: a model is "built" by asking a replica to describe it, and its engine
is a RemoteEngine over the replicas. On top: the `x-selfhost-replica` response
header, and per-replica series on /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily

from selfhost.cluster.remote_engine import SERVED_BY, RemoteEngine, RemoteLLM

REPLICA_HEADER = b"x-selfhost-replica"


class ReplicaHeader:
    """Pure ASGI: names the replica(s) that served a request in `x-selfhost-replica`.

    The replica is known once generation begins, which for a stream is after the
    headers would normally go out, so the response start waits for the first body
    chunk (a stream's first event; for a whole response, the response itself).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: set[str] = set()
        token = SERVED_BY.set(served)
        start: list[dict] = []

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                start.append(message)
                return
            if message["type"] == "http.response.body" and start:
                head = start.pop()
                if served:
                    head = {**head, "headers": [*head.get("headers", []),
                                                (REPLICA_HEADER, ",".join(sorted(served)).encode())]}
                await send(head)
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            SERVED_BY.reset(token)


class ReplicaCollector:
    """Per-replica gauges from the StatsBoard (and this front end's response counts), read at scrape time."""

    def __init__(self, model: str, engine: RemoteEngine):
        self.model, self.engine = model, engine

    def collect(self):
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model", "replica"])

        families = {
            "num_running": gauge("selfhost_replica_num_requests_running", "Requests in a replica's running batch"),
            "num_waiting": gauge("selfhost_replica_num_requests_waiting", "Requests queued in a replica's engine"),
            "kv_blocks_used": gauge("selfhost_replica_kv_blocks_used", "KV-cache blocks held on a replica"),
            "kv_blocks_total": gauge("selfhost_replica_kv_blocks_total", "KV-cache blocks of a replica"),
            "prefix_hit_rate": gauge("selfhost_replica_prefix_cache_hit_rate",
                                     "Share of a replica's prompt tokens served from its prefix cache"),
            "num_requests": gauge("selfhost_replica_requests", "Requests a replica has taken since it started"),
        }
        for replica, s in sorted(self.engine.replicas.items()):
            queried = s["prefix_queried_tokens"]
            values = {**s, "prefix_hit_rate": s["prefix_hit_tokens"] / queried if queried else 0.0}
            for key, family in families.items():
                family.add_metric([self.model, replica], values[key])
        served = gauge("selfhost_replica_responses", "Responses this front end received from each replica")
        for replica, count in sorted(self.engine.served_by.items()):
            served.add_metric([self.model, replica], count)
        replicas = GaugeMetricFamily("selfhost_cluster_replicas", "Engine replicas reporting", labels=["model"])
        replicas.add_metric([self.model], len(self.engine.replicas))
        yield from families.values()
        yield served
        yield replicas


class Frontend:
    """The ingress deployment's class (app.py wraps it with serve.ingress)."""

    def __init__(self, server_settings: dict[str, Any], engine_handle, board_handle, multiplex: bool = True):
        from selfhost.server.settings import ServerSettings

        self.settings = ServerSettings(**server_settings)
        self.engine = RemoteEngine(engine_handle, board_handle, multiplex=multiplex)

    def __serve_build_asgi_app__(self):
        from selfhost.server.app import create_app

        app = create_app(self.settings)
        # The registry's one seam: its model comes from the replicas, not from loading weights here.
        app.state.models._build = self._build_remote
        app.add_middleware(ReplicaHeader)
        self.metrics_registry = app.state.metrics.registry
        return app

    def _build_remote(self, name: str, ref: str | None, model_dir: str, pinned: bool, loras: dict[str, str]):
        """ModelRegistry._build's signature; runs on a worker thread, so it may wait on the replica."""
        from selfhost.server.models import ServedModel

        info = self.engine.handle.describe.remote().result(timeout_s=600)
        self.metrics_registry.register(ReplicaCollector(name, self.engine))
        return ServedModel(name, ref, RemoteLLM(info, model_dir), self.engine, pinned, info["weight_bytes"],
                           info["kv_cache_bytes"], self.settings.keep_alive_s, info["num_params"],
                           info["quantization"])
