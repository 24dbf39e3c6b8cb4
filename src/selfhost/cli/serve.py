"""`selfhost serve [MODEL ...]`: the OpenAI- and Ollama-compatible HTTP server.

Every flag is generated from a field of ServerSettings (server/settings.py), so
defaults, help texts and environment variables (SELFHOST_<FIELD>) are written
once. A flag given on the command line wins over the environment.
"""

from __future__ import annotations

import inspect
import logging
from typing import Annotated, Any, get_args, get_origin

import typer

SKIP_FLAGS = {"models"}  # the positional MODEL arguments


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
    else:
        base = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        option = typer.Option(flag, help=field.description + shown + env, show_default=False)
        hint = base | None
    # None means "not given": the setting then comes from the environment or its default.
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[hint, option])


def _build_command():
    from selfhost.server.settings import ServerSettings

    params = [inspect.Parameter(
        "models", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[list[str] | None, typer.Argument(
            metavar="[MODEL]...", help="Models to preload: folder, Hub id or alias, optionally NAME=REF. "
            "Default: the embedded demo model.", show_default=False)],
    )]
    params += [_option(name, field) for name, field in ServerSettings.model_fields.items() if name not in SKIP_FLAGS]

    def serve(**given: Any) -> None:
        """Serve models over HTTP: OpenAI API under /v1, Ollama API under /api, a chat page at /."""
        settings = ServerSettings(**{k: v for k, v in given.items() if v not in (None, [])})
        run_server(settings)

    serve.__signature__ = inspect.Signature(params)
    serve.__annotations__ = {p.name: p.annotation for p in params}
    return serve


def run_server(settings) -> None:
    import uvicorn

    from selfhost.server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    app.state.on_ready = _print_banner
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                log_level=settings.log_level.lower())


def _print_banner(app) -> None:
    from rich.console import Console

    s = app.state.settings
    console = Console(stderr=True, highlight=False)
    host = "localhost" if s.host in ("127.0.0.1", "0.0.0.0") else s.host
    console.print(f"[bold]selfhost serve[/] on [link]http://{host}:{s.port}[/]  (chat page at /, OpenAI API at "
                  f"/v1, Ollama API at /api, metrics at /metrics)")
    for name, served in app.state.models.models.items():
        engine = served.llm.engine
        console.print(f"  model [bold]{name}[/]: context {served.llm.max_model_len} tokens, KV cache "
                      f"{engine.capacity_tokens} tokens ({served.kv_cache_bytes / 2**30:.2f} GiB), "
                      f"weights {served.weight_bytes / 2**30:.2f} GiB, on {served.llm.device}")
    extras = [f"auth: {len(s.api_key)} key(s)" if s.api_key else "auth: off",
              "load on request: on" if s.allow_load else "load on request: off"]
    console.print("  " + ", ".join(extras))


def register(app: typer.Typer) -> None:
    app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})(_build_command())
