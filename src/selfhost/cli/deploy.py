"""`selfhost deploy kuberay MODEL ...`: write the KubeRay RayService manifest of a `serve --ray` deployment."""

from __future__ import annotations

from pathlib import Path

import typer

deploy_app = typer.Typer(help="Write deployment manifests for running selfhost elsewhere.", no_args_is_help=True)


@deploy_app.command("kuberay")
def kuberay(
    model: str = typer.Argument(..., help="Model the replicas serve: Hub id, alias or a folder inside the image."),
    replicas: int = typer.Option(None, "--replicas", help="Engine replicas (one worker pod each; default 1)."),
    autoscale: str = typer.Option(None, "--autoscale", help="MIN,MAX replicas, scaled by Ray Serve and KubeRay."),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", help="CPUs per replica (and worker pod)."),
    gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", help="GPUs per replica (whole GPUs)."),
    memory_per_replica: str = typer.Option("8Gi", "--memory-per-replica", help="Memory per worker pod."),
    routing: str = typer.Option("prefix", "--routing", help="prefix or round_robin."),
    image: str = typer.Option(None, "--image", help="Container image with Ray and selfhost installed "
                              "(default: rayproject/ray of the pinned version; then give --pip)."),
    pip: list[str] = typer.Option(None, "--pip", help="Packages Ray installs for the app (runtime_env), e.g. "
                                  "'selfhost[ray] @ git+https://...' (repeatable)."),
    name: str = typer.Option("selfhost", "--name", help="The RayService's name."),
    output: Path = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
) -> None:
    """A RayService manifest for MODEL on N replicas; `kubectl apply -f` it on a cluster with the KubeRay operator."""
    from selfhost.cli.ray_serve import cluster_config
    from selfhost.cluster.kuberay import DEFAULT_IMAGE, rayservice_manifest, to_yaml

    cluster = cluster_config({"replicas": replicas, "autoscale": autoscale, "cpus_per_replica": cpus_per_replica,
                              "gpus_per_replica": gpus_per_replica, "routing": routing})
    manifest = rayservice_manifest(model, cluster, name=name, image=image or DEFAULT_IMAGE,
                                   memory_per_replica=memory_per_replica, pip=pip or None)
    text = to_yaml(manifest)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}: RayService {name!r}, {model} on "
                   f"{f'{cluster.autoscale[0]}-{cluster.autoscale[1]}' if cluster.autoscale else cluster.replicas} "
                   "replica(s)", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
