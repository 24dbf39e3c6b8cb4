"""create_app(settings): the FastAPI app behind `selfhost serve`.

State lives on `app.state` (settings, models, metrics, serving); models load in
the lifespan, off the event loop. Routes: OpenAI (chat, completions, Responses) and
Anthropic's Messages under /v1, Ollama under /api, operations (/health, /metrics,
/stats) and the web page at /.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import selfhost
from selfhost.server import (
    anthropic_routes,
    embedding_routes,
    lora_routes,
    ollama_routes,
    openai_routes,
    responses_routes,
)
from selfhost.server.embedding_serving import EmbeddingModels
from selfhost.server.errors import install_error_handlers
from selfhost.server.guards import ApiKeyAuth, CatchAll, RequestLimits
from selfhost.server.metrics import ServerMetrics
from selfhost.server.models import ModelRegistry
from selfhost.server.rag_serving import Collections
from selfhost.server.responses_store import ResponseStore
from selfhost.server.serving import Serving
from selfhost.server.settings import ServerSettings

STATIC_DIR = Path(__file__).parent / "static"
access_log = logging.getLogger("selfhost.access")


class AccessLog:
    """Pure ASGI middleware: one JSON log line and one request count per HTTP request.

    Each record's message is the whole JSON object (with an ISO-8601 UTC `time`), so
    any handler that writes the bare message writes one parseable line per request.
    Pure ASGI (not BaseHTTPMiddleware) so streamed bodies pass through untouched.
    """

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            # The route template, not the raw path, keeps label cardinality bounded.
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status[0])).inc()
            if access_log.isEnabledFor(logging.INFO):  # below --log-level info the line is not even built
                access_log.info(json.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "method": scope["method"], "path": scope["path"], "status": status[0],
                    "duration_ms": round((time.perf_counter() - start) * 1e3, 1),
                    "client": (scope.get("client") or ["?"])[0],
                }))


class AssumeJSON:
    """POST bodies under /v1 and /api are JSON whatever the Content-Type says.

    Ollama's documented examples (`curl -d '{...}'`) send form-encoded headers; without
    this FastAPI would not parse the body and report a confusing type error.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(("/v1/", "/api/")):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            # In place: the access log reads the matched route from this same scope afterwards.
            scope["headers"] = headers + [(b"content-type", b"application/json")]
        await self.app(scope, receive, send)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    gateway = _gateway(settings)  # a bad config fails here, before anything loads or listens
    if gateway is not None:
        settings = settings.model_copy(update={"models": [*settings.models, *gateway.local_model_args()]})
    models = ModelRegistry(settings)
    metrics = ServerMetrics(models)
    if gateway is not None:
        gateway.attach_metrics(metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await models.preload()
        models.start_reaper()
        if gateway is not None:
            await gateway.start()
        if app.state.on_ready is not None:  # the CLI's start-up banner
            app.state.on_ready(app)
        try:
            yield
        finally:
            await models.shutdown()
            if gateway is not None:
                await gateway.aclose()
            app.state.collections.close()
            app.state.responses.close()

    app = FastAPI(title="selfhost", version=selfhost.__version__, lifespan=lifespan,
                  description="OpenAI- and Ollama-compatible server for open-weight models.", **_telemetry_option())
    app.state.settings = settings
    app.state.models = models
    app.state.metrics = metrics
    app.state.serving = Serving(models, metrics, settings.max_n, settings.prefix_cache_scope)
    app.state.embedding_models = EmbeddingModels(settings.embedding_model)
    app.state.collections = Collections(settings.rag_store, settings.vector_url, app.state.embedding_models)
    app.state.responses = ResponseStore(settings.responses_db_path, settings.responses_retention)
    app.state.gateway = gateway
    app.state.on_ready = None
    install_error_handlers(app)
    for router in (openai_routes.router, embedding_routes.router, ollama_routes.router, anthropic_routes.router,
                   responses_routes.router, lora_routes.router):
        app.include_router(router)
    _add_operations(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added innermost first. CORS answers a browser's preflight before the key check (it carries no key).
    if gateway is not None:  # after the key check: remote models are as protected as local ones
        from selfhost.gateway.router import GatewayRouter

        app.add_middleware(GatewayRouter, gateway=gateway)
    app.add_middleware(ApiKeyAuth)
    if gateway is not None:  # outside the key check: virtual keys and the admin's master key are checked there
        from selfhost.gateway.admin import AdminGate
        from selfhost.gateway.router import VirtualKeyEntrance

        app.add_middleware(VirtualKeyEntrance)
        app.add_middleware(AdminGate, gateway=gateway)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(AssumeJSON)
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_body_bytes_value, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes)
    app.add_middleware(CatchAll)
    app.add_middleware(AccessLog, metrics=metrics)
    if gateway is not None:  # outermost: a remote model's ordinary request skips the stack above (same answers)
        from selfhost.gateway.entrance import GatewayEntrance

        app.add_middleware(GatewayEntrance, gateway=gateway)
    return app


def _telemetry_option() -> dict:
    """FastAPI's native OpenTelemetry off when no provider is configured as the app is built.

    Otherwise FastAPI asks on every request whether one has been set since (three
    environment lookups that miss, a few percent of the gateway's CPU per proxied
    request). A provider set up before the server starts (`opentelemetry-instrument`,
    or code that runs before create_app) keeps FastAPI's telemetry as it was.
    """
    try:
        from fastapi.telemetry._api import _unconfigured
        from opentelemetry import _logs, metrics, trace
    except ImportError:  # a FastAPI without native telemetry: nothing to turn off
        return {}
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider())
    if all(_unconfigured(provider) for provider in providers):
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def _gateway(settings: ServerSettings):
    if settings.config is None:
        return None
    from selfhost.gateway.config import load_gateway_config
    from selfhost.gateway.service import Gateway

    return Gateway(load_gateway_config(settings.config))


def _add_operations(app: FastAPI) -> None:
    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> dict:
        return {"status": "ok", "models": request.app.state.models.names()}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", tags=["operations"])
    async def stats(request: Request) -> dict:
        """What the web page's live panel shows: tokens/s and each model's engine state."""
        state = request.app.state
        per_model = {}
        for name, served in list(state.models.models.items()):
            s = served.engine.stats()
            per_model[name] = {
                "running": s.num_running, "waiting": s.num_waiting, "kv_blocks_used": s.kv_blocks_used,
                "kv_blocks_total": s.kv_blocks_total, "kv_usage": s.kv_blocks_used / max(s.kv_blocks_total, 1),
                "prefix_hit_rate": s.prefix_hit_rate, "active_requests": served.active, "steps": s.num_steps,
                # Speculative decoding (null when off): share of proposed tokens accepted, tokens per verification.
                "speculative": s.speculative_method, "spec_acceptance_rate": s.spec_acceptance_rate,
                "spec_mean_accepted_length": s.spec_mean_accepted_length,
            }
        return {"tokens_per_s": round(state.metrics.tokens_per_s(), 2), "models": per_model}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")
