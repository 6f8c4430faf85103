"""Bearer-key checks for /v1 routes (constant-time comparison; /health stays open).

Three kinds of route, and the keys each takes:
    OpenAI routes                         --api-key, or any --auth-file key
    adapter upload, list, describe, delete --admin-api-key (else --api-key), or any --auth-file key
    merge, unmerge, auto_merge (PATCH),   --admin-api-key (else --api-key), or an --auth-file admin key
    load/unload by path
    GET /metrics                          --metrics-api-key, or any key the previous row takes
With no key configured a route is open; /health and /version always are, and /metrics is with
--disable-metrics-auth (its labels name every tenant's adapters, so it is not open by default).
Each check leaves the caller's `Principal` on `request.state.principal`, which decides which
tenants' adapters it sees and whether it sees server paths (tenants.py).
"""

from __future__ import annotations

import hmac
from http import HTTPStatus

from fastapi import Depends, Request

from lora_serve.api.errors import INVALID_REQUEST, APIError
from lora_serve.api.state import ServerState, get_state
from lora_serve.api.tenants import OPEN, Principal


def _unauthorized() -> APIError:
    message = "Incorrect API key provided."
    return APIError(HTTPStatus.UNAUTHORIZED, message, type=INVALID_REQUEST, code="invalid_api_key")


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def check_bearer(request: Request, expected: str | None) -> None:
    """Raise 401 unless `expected` is None or the request carries `Authorization: Bearer <expected>`."""
    if expected is not None and not _matches(_bearer(request), expected):
        raise _unauthorized()


def _authenticate(request: Request, state: ServerState, legacy_key: str | None, legacy: Principal, admin_only: bool) -> None:
    """Set request.state.principal from an --auth-file key, else from `legacy_key` (as `legacy`); else 401."""
    given = _bearer(request)
    if state.keys is not None and given is not None:
        principal = state.keys.identify(given)
        if principal is not None and (principal.is_admin or not admin_only):
            request.state.principal = principal
            return
    if legacy_key is None and state.keys is None:
        request.state.principal = OPEN
    elif legacy_key is not None and _matches(given, legacy_key):
        request.state.principal = legacy
    else:
        raise _unauthorized()


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    config = state.config
    # The --api-key user belongs to no tenant; it is also the admin when no admin key is set.
    _authenticate(request, state, config.api_key, Principal(None, config.admin_api_key is None), admin_only=False)


def require_tenant_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    config = state.config
    _authenticate(request, state, config.admin_api_key or config.api_key, OPEN, admin_only=False)


def require_admin_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    config = state.config
    _authenticate(request, state, config.admin_api_key or config.api_key, OPEN, admin_only=True)


def require_metrics_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    """/metrics: the metrics key or an admin key; open with disable_metrics_auth or when no key is configured."""
    config, metrics_key = state.config, state.config.metrics_api_key
    if config.disable_metrics_auth or (metrics_key is not None and _matches(_bearer(request), metrics_key)):
        return
    if metrics_key is not None and config.api_key is None and config.admin_api_key is None and state.keys is None:
        raise _unauthorized()  # the metrics key is the only one configured
    require_admin_key(request, state)


def principal_of(request: Request) -> Principal:
    return getattr(request.state, "principal", OPEN)
