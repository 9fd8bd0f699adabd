"""vLLM-shaped error responses for the simulated engine.

vLLM >= 0.10.1 answers every failure with ``{"error": {"message", "type", "param", "code"}}`` where
``type`` is an exception class name and ``code`` the integer HTTP status (vllm-contract.md §1.2).

Tree of what the server raises::

    EngineHTTPError(status, type, message)     -> that status, vLLM envelope
      BadRequest (400, BadRequestError)         validation, context overflow
      ModelNotFound (404, NotFoundError)        unknown model / unloaded adapter
    RequestValidationError (FastAPI)           -> 400 "Bad Request" (bad JSON, wrong types), with
                                                  param = the first error's location, as vLLM
    any other exception                         -> 500 InternalServerError (never a bare page)

Unknown routes and methods keep FastAPI's ``{"detail": ...}`` bodies, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

__all__ = [
    "EngineHTTPError",
    "bad_request",
    "error_body",
    "error_response",
    "install_error_handlers",
    "model_not_found",
    "status_type",
]

log = logging.getLogger(__name__)

_TYPES_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def status_type(status: int) -> str:
    """The vLLM-style ``type`` for an HTTP status."""
    default = "InternalServerError" if status >= 500 else "BadRequestError"
    return _TYPES_BY_STATUS.get(status, default)


class EngineHTTPError(Exception):
    """An error the engine answers with ``status`` and the vLLM envelope.

    >>> raise EngineHTTPError(400, "BadRequestError", "max_tokens must be at least 1")
    """

    def __init__(
        self, status: int, err_type: str, message: str, *, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param


def bad_request(message: str, *, param: str | None = None, value: object = None) -> EngineHTTPError:
    """vLLM's ``VLLMValidationError``: the message ends with ``(parameter=…, value=…)``."""
    if param is not None:
        suffix = f"parameter={param}" + (f", value={value}" if value is not None else "")
        message = f"{message} ({suffix})"
    return EngineHTTPError(400, "BadRequestError", message, param=param)


def model_not_found(model: str, valid: list[str]) -> EngineHTTPError:
    msg = f"The model `{model}` does not exist. Valid aliases: {', '.join(valid)}."
    return EngineHTTPError(404, "NotFoundError", msg, param="model")


def error_body(
    status: int, err_type: str, message: str, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(exc: EngineHTTPError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.err_type, exc.message, exc.param), status_code=exc.status
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the app can raise to vLLM's envelope (never a bare 500 page)."""

    async def on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineHTTPError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        param = ".".join(str(x) for x in errors[0].get("loc", ())) if errors else None
        # FastAPI's str(exc) plus no endpoint context (vLLM's FastAPI did not add one).
        count = len(errors)
        lines = [f"{count} validation error{'s' if count != 1 else ''}:"]
        lines += [f"  {err}" for err in errors]
        message = "\n".join(lines)
        return error_response(EngineHTTPError(400, "Bad Request", message, param=param or None))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the simulated engine", exc_info=exc)
        return error_response(EngineHTTPError(500, "InternalServerError", repr(exc)))

    app.add_exception_handler(EngineHTTPError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)
