"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Handlers cover our own `APIError`, the LoRA layer's `AdapterError` (its own status and
param, wherever in a request it is raised), Starlette's `HTTPException` (404 for unknown routes,
405), request validation (pydantic's 422 becomes OpenAI's 400 naming the offending
param; a field no model declares gets OpenAI's "Unrecognized request argument supplied: <name>")
and anything unexpected (500, logged here, never a traceback in the body).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lora_serve.lora.errors import AdapterError, AdapterNotFoundError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == HTTPStatus.UNAUTHORIZED else {}
        return JSONResponse(self.to_dict(), status_code=self.status, headers={**headers, **self.headers})


def invalid_param(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, INVALID_REQUEST, param, code)


def from_adapter_error(exc: AdapterError) -> APIError:
    # A request's `model` (or `adapters`) naming no adapter gets the same code as an unknown model id.
    code = "model_not_found" if isinstance(exc, AdapterNotFoundError) and exc.param in ("model", "adapters") else exc.code
    return APIError(exc.status, exc.message, SERVER_ERROR if exc.status >= 500 else INVALID_REQUEST, exc.param, code)


def param_from_loc(loc: Sequence[str | int]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; None when the error is about the whole body."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not param:
            param = str(part)
        elif "[" in part or part.startswith("function-") or part in _TYPE_NAMES:
            continue  # pydantic's name for one branch of a union, not a field
        else:
            param += f".{part}"
    return param or None


def _validation_message(err: dict) -> str:
    param = param_from_loc(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":  # a field no model declares: OpenAI's wording
        return f"Unrecognized request argument supplied: {param}"
    # Custom validators' messages read better without pydantic's "Value error, " prefix.
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {message}" if param else message


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


async def _on_adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
    return from_adapter_error(exc).to_response()


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    if status == HTTPStatus.NOT_FOUND:
        message = f"Invalid URL ({request.method} {request.url.path})"  # OpenAI's wording
    else:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    error = APIError(status, message, SERVER_ERROR if status >= 500 else INVALID_REQUEST)
    response = error.to_response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    message = "; ".join(_validation_message(e) for e in errors) or "invalid request"
    return invalid_param(param_from_loc(first.get("loc", ())), message).to_response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error", SERVER_ERROR).to_response()


def install_error_handlers(app: FastAPI) -> None:
    # Starlette calls each handler only with its own exception class; its signature takes any Exception.
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(AdapterError, _on_adapter_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _on_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
