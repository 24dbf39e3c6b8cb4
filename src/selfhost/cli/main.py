"""Entry point of the `selfhost` console script.

Each command group lives in its own module; this file only wires them into one
Typer app and turns user errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from selfhost.errors import SelfhostError

app = typer.Typer(
    name="selfhost",
    help="Run open-weight language models on your own hardware, and know what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    from selfhost.cli import run as run_cmd

    run_cmd.register(app)
    from selfhost.cli import bench as bench_cmd

    bench_cmd.register(app)
    from selfhost.cli import plan as plan_cmd

    plan_cmd.register(app)
    from selfhost.cli import rag as rag_cmd

    rag_cmd.register(app)
    from selfhost.cli import train as train_cmd

    train_cmd.register(app)
    from selfhost.cli import quant as quant_cmd

    quant_cmd.register(app)
    from selfhost.cli import serve as serve_cmd

    serve_cmd.register(app)


def _configure_logging() -> None:
    # selfhost's own INFO lines (model loaded, KV capacity) go to stderr; libraries stay at WARNING.
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logger = logging.getLogger("selfhost")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main() -> None:
    _configure_logging()
    _register_commands()
    try:
        app()
    except SelfhostError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(1)
