"""The Ray Serve application: Frontend (HTTP) -> EngineReplica xN (one AsyncEngine each), plus a StatsBoard.

`build_app(args)` is an application builder in Serve's sense, so the same app
runs from `selfhost serve --ray`, from `serve run selfhost.cluster.app:build_app`
and from a KubeRay RayService (`import_path: selfhost.cluster.app:build_app`,
`args:` as below). `args` is JSON: {"server": {ServerSettings fields},
"cluster": {ClusterConfig fields}}.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from selfhost.cluster.config import ClusterConfig
from selfhost.cluster.frontend import Frontend
from selfhost.cluster.replica import EngineReplica
from selfhost.cluster.stats_board import StatsBoard

IMPORT_PATH = "selfhost.cluster.app:build_app"
FRONTEND_MAX_ONGOING_REQUESTS = 10_000  # every HTTP request passes the front end; it only waits on replicas


def build_app(args: dict[str, Any]) -> Application:
    server = dict(args.get("server") or {})
    cluster = ClusterConfig.from_dict(args.get("cluster") or {})
    engine = serve.deployment(EngineReplica, name="EngineReplica", **cluster.deployment_options())
    board = serve.deployment(StatsBoard, name="StatsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
    frontend = serve.deployment(serve.ingress()(Frontend), name="Frontend", num_replicas=1,
                                ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=FRONTEND_MAX_ONGOING_REQUESTS)
    stats = board.bind()
    return frontend.bind(server, engine.bind(server, cluster.cpus_per_replica, stats,
                                                  cluster.stream_interval_ms / 1e3, cluster.merge_deltas), stats,
                         cluster.multiplex_streams)
