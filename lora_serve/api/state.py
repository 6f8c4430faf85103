"""What every route needs, held on `app.state` (no module globals): the engine, config, model names."""

from __future__ import annotations

from collections.abc import Callable
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
    engine: AsyncEngine
    config: ServerConfig
    models: ModelRegistry
    token_text: TokenText
    admission: Admission
    metrics: RequestMetrics
    keys: KeyTable | None = None  # --auth-file

    @classmethod
    def create(
        cls,
        engine: AsyncEngine,
        config: ServerConfig,
        owner_of: Callable[[str], str | None] = lambda name: None,
    ) -> ServerState:
        """owner_of: adapter name -> the tenant that uploaded it (None: visible to everyone)."""
        catalog = engine.adapters
        return cls(
            engine=engine,
            config=config,
            models=ModelRegistry(
                config.served_model_name or engine.base_name,
                engine.model_path,
                engine.max_model_len,
                catalog,
                lambda: catalog.merged_name,
                owner_of,
                engine.run_blocking,
            ),
            token_text=TokenText(engine.tokenizer),
            admission=Admission(config.max_queue, config.retry_after_s, config.request_timeout_s),
            metrics=RequestMetrics(engine),
            keys=KeyTable.load(config.auth_file) if config.auth_file is not None else None,
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.lora_serve
