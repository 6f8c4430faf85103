"""Bearer-key checks for /v1 routes (constant-time comparison; /health stays open).

OpenAI routes need --api-key; adapter management needs --admin-api-key, or --api-key
when no admin key is set.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus

from fastapi import Depends, Request

from lora_serve.api.errors import INVALID_REQUEST, APIError
from lora_serve.api.state import ServerState, get_state


def check_bearer(request: Request, expected: str | None) -> None:
    """Raise 401 unless `expected` is None or the request carries `Authorization: Bearer <expected>`."""
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(
            HTTPStatus.UNAUTHORIZED,
            "Incorrect API key provided.",
            type=INVALID_REQUEST,
            code="invalid_api_key",
        )


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    check_bearer(request, state.config.api_key)


def require_admin_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    check_bearer(request, state.config.admin_api_key or state.config.api_key)
