"""What every route needs, held on `app.state` (no module globals): the engine, config, model names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from lora_serve.api.admission import Admission
from lora_serve.api.logprobs import TokenText
from lora_serve.api.metrics import RequestMetrics
from lora_serve.api.models import ModelRegistry
from lora_serve.api.tenants import KeyTable
from lora_serve.config import ServerConfig

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    engine: "AsyncEngine"
    config: ServerConfig
    models: ModelRegistry
    token_text: TokenText
    admission: Admission
    metrics: RequestMetrics
    keys: KeyTable | None = None  # --auth-file


def get_state(request: Request) -> ServerState:
    return request.app.state.lora_serve
