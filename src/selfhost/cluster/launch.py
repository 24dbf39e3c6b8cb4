"""`selfhost serve --ray`: reach (or start) Ray, check the replicas fit, deploy, serve until Ctrl-C.

Every failure before serving is one ClusterError line: Ray not installed, an
address that does not answer, more replicas than the cluster's CPUs or GPUs, a
setting that has no meaning across replicas.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

from selfhost.cluster.config import ClusterConfig
from selfhost.errors import SelfhostError

log = logging.getLogger("selfhost.cluster")

CONNECT_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 900.0  # replicas load their model before the app is ready


class ClusterError(SelfhostError):
    """`serve --ray` cannot start: Ray missing or unreachable, or the replicas do not fit."""


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ClusterError("--ray needs Ray Serve, which is not installed: pip install 'selfhost[ray]'") from None


def check_settings(settings) -> None:
    """Server settings that cannot carry over to replicas."""
    if len(settings.models) > 1:
        raise ClusterError(f"--ray serves one model per app; got {len(settings.models)}: {', '.join(settings.models)}")
    refused = {"allow_load": settings.allow_load, "lora": settings.lora, "config": settings.config,
               "memory_budget": settings.memory_budget}
    given = [name for name, value in refused.items() if value]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ClusterError(f"{flags} cannot be combined with --ray (each replica holds one fixed model; a gateway "
                           "config points at the Ray app's URL instead)")


def check_port(host: str, port: int) -> int:
    """The HTTP port Serve's proxy will take, checked free before Ray starts (0: a free one, chosen here)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            reason = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be used: {err.strerror}"
            raise ClusterError(f"port {port} on {host} {reason}; choose another with --port") from None
        return sock.getsockname()[1]


def _check_reachable(address: str) -> None:
    """A TCP connect before ray.init, which would otherwise retry for a long while."""
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(f"cannot reach Ray at --address {address}: {err.strerror or err}") from None


def connect(cluster: ClusterConfig) -> None:
    """ray.init for this config: a local instance with every CPU, or the given cluster."""
    import ray

    quiet = {"logging_level": logging.WARNING, "include_dashboard": False}
    if cluster.address is None:
        ray.init(address="local", num_cpus=os.cpu_count(), **quiet)
        return
    if cluster.address != "auto":
        _check_reachable(cluster.address)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
    except ConnectionError as err:
        hint = " (start one with `ray start --head`)" if cluster.address == "auto" else ""
        raise ClusterError(f"cannot connect to Ray at --address {cluster.address}{hint}: {err}") from None


def check_resources(cluster: ClusterConfig) -> None:
    """Refuse a replica count the cluster cannot place, instead of waiting for it forever."""
    import ray

    have = ray.cluster_resources()
    count = f"--autoscale up to {cluster.peak_replicas}" if cluster.autoscale else f"--replicas {cluster.replicas}"
    for resource, each in (("CPU", cluster.cpus_per_replica), ("GPU", cluster.gpus_per_replica)):
        need = cluster.peak_replicas * each
        if need > have.get(resource, 0):
            raise ClusterError(f"{count} x --{resource.lower()}s-per-replica {each:g} needs {need:g} {resource}s; "
                               f"the Ray cluster has {have.get(resource, 0):g}")


def app_args(settings, cluster: ClusterConfig) -> dict[str, Any]:
    """build_app's JSON arguments from the server's settings (only what differs from the defaults)."""
    server = settings.model_dump(mode="json", exclude_defaults=True, exclude={"host", "port"})
    return {"server": server, "cluster": cluster.to_dict()}


def deploy(settings, cluster: ClusterConfig, blocking_ready: bool = True):
    """Start Serve's HTTP proxy on settings.host:port and run the app; returns the ingress handle."""
    from ray import serve

    from selfhost.cluster.app import build_app

    serve.start(http_options={"host": settings.host, "port": settings.port},
                logging_config={"log_level": "WARNING"})
    return serve.run(build_app(app_args(settings, cluster)), name=cluster.app_name, route_prefix="/",
                     logging_config={"log_level": "WARNING"})


def serve_forever(settings, cluster: ClusterConfig, banner) -> None:
    """The CLI's whole `--ray` path; Ctrl-C removes the app (and the local Ray instance, if started here)."""
    require_ray()
    check_settings(settings)
    settings = settings.model_copy(update={"port": check_port(settings.host, settings.port)})
    import ray
    from ray import serve

    connect(cluster)
    try:
        check_resources(cluster)
        started = time.perf_counter()
        deploy(settings, cluster)
        banner(settings.port, time.perf_counter() - started)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if cluster.address is None:
                serve.shutdown()
            else:
                serve.delete(cluster.app_name)
        finally:
            ray.shutdown()
