"""A KubeRay `RayService` manifest for the same app `selfhost serve --ray` runs.

The Serve application is `selfhost.cluster.app:build_app` with the same JSON
arguments (server settings + ClusterConfig), so Kubernetes and a laptop run one
definition. The head pod holds Serve's controller, the HTTP proxy, the front end
and the stats board (it offers no CPUs, so no engine replica lands there); each
worker pod holds one engine replica, sized by --cpus/--gpus-per-replica. Under
--autoscale the worker group scales between MIN and MAX pods with KubeRay's
in-tree autoscaler, following Serve's replica count.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from selfhost.cluster.config import ClusterConfig
from selfhost.errors import InvalidParameterError

RAY_VERSION = "2.60.0"  # the Ray that constraints.txt pins; the image must carry the same
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
SERVE_PORT = 8000
_K8S_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)$")  # a unit required: a bare 8 is bytes


def _cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def serve_config(model: str, cluster: ClusterConfig, server: dict[str, Any] | None = None,
                 pip: list[str] | None = None) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2): one application, selfhost's app builder and its arguments."""
    app: dict[str, Any] = {
        "name": cluster.app_name, "route_prefix": "/", "import_path": "selfhost.cluster.app:build_app",
        "args": {"server": {**(server or {}), "models": [model]}, "cluster": cluster.to_dict()},
    }
    if pip:
        app["runtime_env"] = {"pip": list(pip)}
    return {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}, "applications": [app]}


def rayservice_manifest(model: str, cluster: ClusterConfig, *, name: str = "selfhost", image: str = DEFAULT_IMAGE,
                        memory_per_replica: str = "8Gi", head_cpus: float = 2, head_memory: str = "4Gi",
                        server: dict[str, Any] | None = None, pip: list[str] | None = None) -> dict[str, Any]:
    for flag, value in (("--memory-per-replica", memory_per_replica), ("--head-memory", head_memory)):
        if not _K8S_QUANTITY.match(value):
            raise InvalidParameterError(f"{flag} {value!r}: expected a Kubernetes quantity such as 8Gi or 512Mi")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?", name):
        raise InvalidParameterError(f"--name {name!r}: a Kubernetes name is lowercase letters, digits and '-' "
                                    "(at most 53 characters)")
    worker_limits: dict[str, Any] = {"cpu": _cpu_quantity(cluster.cpus_per_replica), "memory": memory_per_replica}
    if cluster.gpus_per_replica:
        if not float(cluster.gpus_per_replica).is_integer():
            raise InvalidParameterError(f"--gpus-per-replica {cluster.gpus_per_replica:g}: a pod takes whole GPUs")
        worker_limits["nvidia.com/gpu"] = int(cluster.gpus_per_replica)
    low, high = cluster.autoscale or (cluster.replicas, cluster.replicas)
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"spec": {"containers": [{
            "name": "ray-head", "image": image,
            "resources": {"limits": {"cpu": _cpu_quantity(head_cpus), "memory": head_memory},
                          "requests": {"cpu": _cpu_quantity(head_cpus), "memory": head_memory}},
            "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}],
        }]}},
    }
    workers = {
        "groupName": "engines", "replicas": low, "minReplicas": low, "maxReplicas": high,
        # Ray counts whole CPUs per node; the pod's limit is the replica's exact share.
        "rayStartParams": {"num-cpus": str(math.ceil(cluster.cpus_per_replica))},
        "template": {"spec": {"containers": [{
            "name": "ray-worker", "image": image,
            "resources": {"limits": worker_limits, "requests": dict(worker_limits)},
        }]}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "selfhost"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(model, cluster, server, pip), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": cluster.autoscale is not None,
                "headGroupSpec": head,
                "workerGroupSpecs": [workers],
            },
        },
    }


class _Literal(str):
    """A multi-line string written as a YAML block (serveConfigV2 reads as the config it is)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def to_yaml(manifest: dict[str, Any]) -> str:
    spec = {**manifest["spec"], "serveConfigV2": _Literal(manifest["spec"]["serveConfigV2"])}
    return yaml.dump({**manifest, "spec": spec}, Dumper=_Dumper, sort_keys=False)
