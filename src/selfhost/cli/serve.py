"""`selfhost serve [MODEL ...]`: the OpenAI- and Ollama-compatible HTTP server.

Every flag is generated from a field of ServerSettings (server/settings.py), so
defaults, help texts and environment variables (SELFHOST_<FIELD>) are written
once. A flag given on the command line wins over the environment.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
import sys
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from selfhost.cli.console import make_console
from selfhost.cli.ray_serve import pop_ray_options, ray_parameters, serve_on_ray
from selfhost.errors import InvalidParameterError, SelfhostError

SKIP_FLAGS = {"models"}  # the positional MODEL arguments


class ServerStartError(SelfhostError):
    """The server cannot start: its port is taken, or a preloaded model does not fit."""


def _option(name: str, field) -> inspect.Parameter:
    annotation = field.annotation
    flag = "--" + name.replace("_", "-")
    default = field.get_default(call_default_factory=True)
    # Escaped brackets: Typer renders help as rich markup.
    shown = "" if default in (None, [], "") else f" \\[default: {default}]"
    env = f" \\[env: SELFHOST_{name.upper()}]"
    if annotation is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=field.description + shown + env, show_default=False)
        hint = bool | None
    elif get_origin(annotation) is list:
        option = typer.Option(flag, help=field.description + env, show_default=False)
        hint = list[str] | None
    elif get_origin(annotation) is Literal:  # a choice: taken as text, checked by the settings model
        option = typer.Option(flag, help=field.description + shown + env, show_default=False)
        hint = str | None
    else:
        base = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        option = typer.Option(flag, help=field.description + shown + env, show_default=False)
        hint = base | None
    # None means "not given": the setting then comes from the environment or its default.
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[hint, option])


def _build_command():
    from pydantic import ValidationError

    from selfhost.server.settings import ServerSettings

    params = [inspect.Parameter(
        "models", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[list[str] | None, typer.Argument(
            metavar="[MODEL]...", help="Models to preload: folder, Hub id or alias, optionally NAME=REF. "
            "Default: the embedded demo model.", show_default=False)],
    )]
    params += [_option(name, field) for name, field in ServerSettings.model_fields.items() if name not in SKIP_FLAGS]
    params += ray_parameters()  # --ray and its flags: the engines as Ray Serve replicas (cli/ray_serve.py)

    def serve(**given: Any) -> None:
        """Serve models over HTTP: OpenAI API under /v1, Ollama API under /api, a chat page at /."""
        ray_options = pop_ray_options(given)
        try:
            settings = ServerSettings(**{k: v for k, v in given.items() if v not in (None, [])})
        except ValidationError as err:
            raise InvalidParameterError(_describe(err)) from None
        if ray_options is not None:
            serve_on_ray(settings, ray_options)
            return
        run_server(settings)

    serve.__signature__ = inspect.Signature(params)
    serve.__annotations__ = {p.name: p.annotation for p in params}
    return serve


def _describe(err) -> str:
    """A pydantic ValidationError of ServerSettings as one line naming the flag and the value."""
    first = err.errors()[0]
    name = str(first["loc"][0]) if first.get("loc") else "settings"
    message = first["msg"].removeprefix("Value error, ")
    return f"--{name.replace('_', '-')} (or SELFHOST_{name.upper()}) {first.get('input')!r}: {message}"


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads, so a busy port fails in a second, not after a load."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # a response written in two parts waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServerStartError(f"port {port} on {host} is already in use (another server?); stop it or "
                                   "choose another with --port") from None
        raise ServerStartError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def run_server(settings) -> None:
    """Bind the port, load the models, then serve; each failure is one line and exit 1."""
    sock = listen_socket(settings.host, settings.port)
    try:
        import uvicorn

        from selfhost.server.app import create_app

        _configure_logging(settings.log_level)
        app = create_app(settings)
        port = sock.getsockname()[1]  # the real one when --port 0
        app.state.on_ready = lambda app: _print_banner(app, port)
        # h11 refuses a header block still incomplete at 16 KiB with a bare 400; let it read up to our own
        # limit (plus room for the request line) so oversized headers get guards.RequestLimits' 431.
        config = uvicorn.Config(app, log_config=None, access_log=False, log_level=settings.log_level.lower(),
                                h11_max_incomplete_event_size=settings.max_header_bytes + 16 * 1024)
        # uvicorn's own loop choice (uvloop where installed, as `uvicorn.run` and the test servers get).
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(_load_then_serve(app, uvicorn.Server(config), sock))
    except KeyboardInterrupt:  # Ctrl-C while a model loads; once serving, uvicorn handles it
        raise typer.Exit(130) from None
    finally:
        sock.close()


async def _load_then_serve(app, server, sock: socket.socket) -> None:
    """Preload outside uvicorn's lifespan, so a model that cannot load surfaces as the CLI's own error."""
    from selfhost.server.errors import APIError

    models = app.state.models
    try:
        await models.preload()
    except BaseException as err:
        await models.shutdown()  # the models that did load, before the one that failed
        if isinstance(err, APIError):  # over --memory-budget: a 507 for a client, a user error here
            raise ServerStartError(err.message) from None
        raise
    await server.serve(sockets=[sock])


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("selfhost").setLevel(level.upper())
    # The access log is data: each record one JSON line as written, never wrapped or decorated by rich, and
    # alone on stdout (banner and logs go to stderr), so `selfhost serve > access.jsonl` keeps exactly it.
    access = logging.getLogger("selfhost.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers = [handler]
    access.propagate = False


def _print_banner(app, port: int) -> None:
    s = app.state.settings
    console = make_console(stderr=True, highlight=False)
    host = "localhost" if s.host in ("127.0.0.1", "0.0.0.0") else s.host
    console.print(f"[bold]selfhost serve[/] on [link]http://{host}:{port}[/]  (chat page at /, OpenAI API at "
                  f"/v1, Ollama API at /api, metrics at /metrics)")
    for name, served in app.state.models.models.items():
        engine = served.llm.engine
        console.print(f"  model [bold]{name}[/]: context {served.llm.max_model_len} tokens, KV cache "
                      f"{engine.capacity_tokens} tokens ({served.kv_cache_bytes / 2**30:.2f} GiB), "
                      f"weights {served.weight_bytes / 2**30:.2f} GiB, on {served.llm.device}")
    extras = [f"auth: {len(s.api_key)} key(s)" if s.api_key else "auth: off",
              "load on request: on" if s.allow_load else "load on request: off"]
    console.print("  " + ", ".join(extras))
    if app.state.gateway is not None:
        console.print("  " + app.state.gateway.describe())


def register(app: typer.Typer) -> None:
    app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})(_build_command())
