"""Entry point of the `selfhost` console script.

Each command group lives in its own module; this file only wires them into one
Typer app and turns user errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from selfhost.errors import SelfhostError

app = typer.Typer(
    name="selfhost",
    help="Run open-weight language models on your own hardware, and know what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version; the source tree's when selfhost is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfhost")
    except PackageNotFoundError:
        from selfhost import __version__

        return __version__


def _print_version(requested: bool) -> None:
    if requested:
        print(f"selfhost {package_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    pass  # options that apply before any command (the help text is the app's)


# One module per command group, each exposing register(app).
COMMAND_MODULES = ("run", "serve", "train", "quant", "plan", "prices", "bench", "rag", "shrink", "lora", "keys",
                   "deploy")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"selfhost.cli.{name}").register(app)


def _configure_logging() -> None:
    # selfhost's own INFO lines (model loaded, KV capacity) go to stderr; libraries stay at WARNING.
    # On a terminal rich's handler; elsewhere (a file, a CI log) one plain line per record, never wrapped.
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
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
        # Escaped: a message may hold brackets that are not markup (pip install 'selfhost[ray]').
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(1)
