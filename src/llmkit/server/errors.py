"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``; on the routes of
Anthropic's Messages API, in Anthropic's: ``{"type": "error", "error": {"type", "message"}}``.

Handlers turn every failure into that shape at the HTTP boundary: FastAPI's validation errors
(which it would answer with 422) become 400s, llmkit's own errors map to the status a client
expects, and anything unexpected is a 500 that names the exception without a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import ContextLengthError, InvalidSamplingError, LLMKitError

log = logging.getLogger("llmkit.server")

# HTTP status -> OpenAI error type
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client as it is: status, message, and OpenAI's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Anthropic's Messages routes answer errors in Anthropic's shape: {"type": "error", "error": {"type", "message"}}
ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    408: "timeout_error", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def respond(request: Request, error: APIError) -> JSONResponse:
    """The error in the shape of the API its route speaks."""
    if speaks_anthropic(request.url.path):
        return JSONResponse(anthropic_body(error.status, error.message), status_code=error.status,
                            headers=error.headers)
    return error.response()


def from_llmkit_error(exc: LLMKitError) -> APIError:
    """The client's view of an error the library raised while checking or running a request."""
    from llmkit.engine import QueueFullError

    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidSamplingError):
        message = str(exc)
        # messages start "name=value is out of range": name the parameter
        param = message.split("=", 1)[0] if "=" in message.split(" ", 1)[0] else None
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is busy: {exc}", code="queue_full", headers={"Retry-After": "1"})
    try:
        from llmkit.constrain import UnsupportedSchemaError
    except ImportError:  # pragma: no cover - constrain is optional at import time
        UnsupportedSchemaError = ()
    if UnsupportedSchemaError and isinstance(exc, UnsupportedSchemaError):
        return APIError(400, str(exc), param="response_format", code="unsupported_schema")
    try:
        from llmkit.tokenizer import ChatTemplateError
    except ImportError:  # pragma: no cover
        ChatTemplateError = ()
    if ChatTemplateError and isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), param="messages", code="invalid_messages")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return APIError(500, f"{type(exc).__name__}: {exc}", code="internal_error")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line for pydantic/FastAPI validation errors, and the parameter concerned."""
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', msg)})")
            param = None
        else:
            parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


def validation_error(errors: list[dict]) -> APIError:
    message, param = _validation_message(errors)
    return APIError(400, f"Invalid request: {message}", param=param, code="invalid_request")


def install(app: FastAPI) -> None:
    """Register the handlers that give every error response OpenAI's shape (Anthropic's on its routes)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"There is no route {request.method} {request.url.path}. See /docs for the API."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        return respond(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(LLMKitError)
    async def _llmkit(request: Request, exc: LLMKitError):
        error = from_llmkit_error(exc)
        if error.param == "messages" and not request.url.path.endswith("/chat/completions"):
            error.param = "prompt"
        return respond(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return respond(request, APIError(500, f"Internal error ({type(exc).__name__}: {exc}). This is a bug in "
                                              "llmkit; the server log has the traceback.", code="internal_error"))
