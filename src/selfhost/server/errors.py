"""Errors as OpenAI error objects, and the handlers that produce them.

Every error response has the shape `{"error": {"message", "type", "param", "code"}}`,
except under /api (the Ollama API), whose clients expect `{"error": "message"}`, and
under /v1/messages (Anthropic's API): `{"type": "error", "error": {"type", "message"}}`.
Request validation (malformed JSON, wrong types, bad ranges) is a 400, as OpenAI
answers it, not FastAPI's default 422.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfhost.errors import (
    ContextLengthError,
    InvalidParameterError,
    ModelNotFoundError,
    SelfhostError,
    UnsupportedModelError,
)
from selfhost.lora.errors import AdapterError, AdapterSlotsBusyError

log = logging.getLogger("selfhost.server")

# OpenAI's `type` for each status it uses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    507: "insufficient_memory",
}

# Anthropic's `type` for each status it uses; any other is invalid_request_error (4xx) or api_error (5xx).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

# Library errors a client can cause -> (status, code).
_SELFHOST_ERRORS: dict[type[SelfhostError], tuple[int, str]] = {
    ContextLengthError: (400, "context_length_exceeded"),
    InvalidParameterError: (400, "invalid_parameter"),
    ModelNotFoundError: (404, "model_not_found"),
    UnsupportedModelError: (400, "unsupported_model"),
    AdapterError: (400, "invalid_adapter"),
    AdapterSlotsBusyError: (429, "adapter_slots_busy"),  # every LoRA slot is held by running requests
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class OllamaErrorBody(BaseModel):
    error: str


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    type: str = "error"
    error: AnthropicErrorDetail


def documented_errors(body: type[BaseModel]) -> dict:
    """The error statuses every API route can answer, for the OpenAPI schema (generated clients read it)."""
    reasons = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown model or object",
               413: "Request body too large"}
    return {status: {"model": body, "description": reason} for status, reason in reasons.items()}


class APIError(Exception):
    """An error the server answers with; raised by routes and serving code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ModelMemoryError(APIError):
    """Loading this model would exceed the server's memory budget."""

    def __init__(self, message: str):
        super().__init__(message, status=507, param="model", code="memory_budget_exceeded")


def from_selfhost_error(err: SelfhostError, fields: Mapping[str, str] | None = None) -> APIError:
    """The API error for a library error. `fields` renames the library's `param` (the engine's
    "prompt", "max_tokens") to the request's own field ("messages", "max_completion_tokens")."""
    param = getattr(err, "param", None)
    if param is not None and fields:
        param = fields.get(param, param)
    status, code = 400, "invalid_request"
    for cls in type(err).__mro__:
        if cls in _SELFHOST_ERRORS:
            status, code = _SELFHOST_ERRORS[cls]
            break
    return APIError(str(err), status, param=param, code=code)


def _validation_error(err: RequestValidationError) -> APIError:
    first = err.errors()[0] if err.errors() else {}
    # pydantic names the member of a union it tried ("constrained-str", "list[int]"): not a field.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not ("-" in str(p) or "[" in str(p))]
    if first.get("type") == "json_invalid":
        return APIError(f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                        code="invalid_json")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    param = ".".join(loc) or None
    return APIError(f"{param}: {message}" if param else message, param=param, code="invalid_value")


def anthropic_body(err: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(request: Request, err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)
    if request.url.path.startswith("/v1/messages"):
        return JSONResponse(anthropic_body(err), status_code=err.status, headers=headers)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(request, err)

    @app.exception_handler(SelfhostError)
    async def _selfhost_error(request: Request, err: SelfhostError):
        return error_response(request, from_selfhost_error(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error_response(request, _validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else HTTPStatus(err.status_code).phrase
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        response = error_response(request, APIError(message, err.status_code))
        for name, value in (err.headers or {}).items():  # 405's Allow, for one
            response.headers[name] = value
        return response
    # Anything else is guards.CatchAll's: an exception handler here would hand it on to uvicorn,
    # which closes the keep-alive connection.
