"""GET /v1/models, /v1/models/{model}, /health, /version (open), /metrics (Prometheus text format; its own key, see auth.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lora_serve import __version__
from lora_serve.api.auth import principal_of
from lora_serve.api.models import ModelCard, ModelList
from lora_serve.api.state import ServerState, get_state

v1_router = APIRouter()
open_router = APIRouter()
metrics_router = APIRouter()


@v1_router.get("/models")
async def list_models(request: Request, state: ServerState = Depends(get_state)) -> ModelList:
    await asyncio.to_thread(state.engine.adapters.drop_removed)  # what other replicas deleted from --adapter-dir
    return state.models.model_list(principal_of(request))


@v1_router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request, state: ServerState = Depends(get_state)) -> ModelCard:
    """The base or an adapter the caller may see, by any name a request's `model` takes: the base's id may hold
    '/' (e.g. --served-model-name org/name), hence the path parameter."""
    await state.models.sync(model)
    return state.models.card(model, principal_of(request))


@open_router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    if state.engine.is_healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unhealthy"}, status_code=503)


@metrics_router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@open_router.get("/version")
async def version() -> dict:
    return {"version": __version__}
