"""`selfhost serve --ray ...`: the flags that put the server's engines on Ray Serve replicas.

cli/serve.py adds these parameters to its generated command and hands over to
`serve_on_ray` when `--ray` is given; everything else about the server (its
settings, its one-line errors) stays as for a single process.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from selfhost.errors import InvalidParameterError

RAY_FLAGS: dict[str, tuple[type, Any, str]] = {
    "ray": (bool, False, ("Run the engine as Ray Serve replicas (pip install 'selfhost[ray]'); the HTTP APIs, "
                          "page and metrics stay the same.")),
    "replicas": (int, None, "--ray: how many engine replicas (default 1)."),
    "autoscale": (str, None, "--ray: MIN,MAX replicas, scaled by Ray Serve on requests in flight per replica."),
    "address": (str, None, ("--ray: an existing Ray cluster (auto, HOST:PORT or ray://HOST:10001); default: "
                            "start a local Ray instance.")),
    "cpus_per_replica": (float, None, "--ray: CPUs each replica reserves (and torch threads it uses; default 1)."),
    "gpus_per_replica": (float, None, "--ray: GPUs each replica reserves (default 0)."),
    "routing": (str, None, ("--ray: prefix (requests sharing a prompt prefix go to the replica that cached it; "
                            "default) or round_robin.")),
}


def ray_parameters() -> list[inspect.Parameter]:
    params = []
    for name, (kind, default, help_text) in RAY_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        decl = (flag,) if kind is not bool else (f"{flag}/--no-{flag[2:]}",)
        hint = kind if kind is bool else kind | None
        option = typer.Option(*decl, help=help_text, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[hint, option]))
    return params


def pop_ray_options(given: dict[str, Any]) -> dict[str, Any] | None:
    """Take the --ray flags out of the command's arguments; None when --ray is off (other ray flags: an error)."""
    options = {name: given.pop(name, None) for name in RAY_FLAGS}
    if not options.pop("ray"):
        stray = [name for name, value in options.items() if value is not None]
        if stray:
            raise InvalidParameterError(f"--{stray[0].replace('_', '-')} applies only with --ray")
        return None
    return options


def cluster_config(options: dict[str, Any]):
    from selfhost.cluster.config import ClusterConfig

    if options["replicas"] is not None and options["autoscale"] is not None:
        raise InvalidParameterError("give --replicas or --autoscale, not both")
    autoscale = options.pop("autoscale")
    fields = {k: v for k, v in options.items() if v is not None}
    if autoscale is not None:
        fields["autoscale"] = ClusterConfig.parse_autoscale(autoscale)
    return ClusterConfig(**fields)


def serve_on_ray(settings, options: dict[str, Any]) -> None:
    from selfhost.cli.console import make_console
    from selfhost.cluster.launch import serve_forever

    cluster = cluster_config(options)
    console = make_console(stderr=True, highlight=False)

    def banner(port: int, seconds: float) -> None:
        host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
        scale = (f"{cluster.autoscale[0]}-{cluster.autoscale[1]} replicas (autoscaled)" if cluster.autoscale
                 else f"{cluster.replicas} replica(s)")
        where = cluster.address or "a local Ray instance"
        console.print(f"[bold]selfhost serve --ray[/] on [link]http://{host}:{port}[/] after {seconds:.0f}s: "
                      f"{scale} of {settings.models[0] if settings.models else 'selfhost/shakespeare'}, "
                      f"{cluster.cpus_per_replica:g} CPU / {cluster.gpus_per_replica:g} GPU each, {cluster.routing} "
                      f"routing, on {where}")

    serve_forever(settings, cluster, banner)
