"""The FastAPI app factory and the uvicorn runner.

    app = build_app(engine, ServerConfig(...))   # routes only translate; the engine does the work
    run_server(engine, ServerConfig(...))        # blocks until Ctrl-C; leaves the engine to its owner
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import uvicorn
from fastapi import APIRouter, Depends, FastAPI

from lora_serve import __version__
from lora_serve.api import adapters, chat, completions, info
from lora_serve.api.auth import require_admin_key, require_api_key
from lora_serve.api.errors import install_error_handlers
from lora_serve.api.logprobs import TokenText
from lora_serve.api.models import ModelRegistry
from lora_serve.api.state import ServerState
from lora_serve.config import ServerConfig

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine


def build_app(engine: "AsyncEngine", config: ServerConfig) -> FastAPI:
    app = FastAPI(title="lora-serve", version=__version__)
    base_name = config.served_model_name or engine.base_name
    app.state.lora_serve = ServerState(
        engine=engine,
        config=config,
        models=ModelRegistry(
            base_name, engine.model_path, engine.max_model_len, engine.lora.registry, lambda: engine.lora.merged.name
        ),
        token_text=TokenText(engine.tokenizer),
    )
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])
    v1.include_router(chat.router)
    v1.include_router(completions.router)
    v1.include_router(info.v1_router)
    app.include_router(v1)
    app.state.adapter_admin = adapters.AdapterAdmin(engine, base_name, engine.lora.config.allowed_lora_dir)
    # Management needs the admin key (not the user key), so it is a router of its own, tagged apart.
    admin = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)], tags=["admin"])
    admin.include_router(adapters.router)
    app.include_router(admin)
    app.include_router(info.open_router)
    install_error_handlers(app)
    return app


def build_server(engine: "AsyncEngine", config: ServerConfig) -> uvicorn.Server:
    """A uvicorn server for the app; `.run()` blocks, tests run it on a thread and set `.should_exit`."""
    app = build_app(engine, config)
    # log_config=None keeps the caller's logging setup instead of uvicorn's own.
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None))


def run_server(engine: "AsyncEngine", config: ServerConfig) -> None:
    build_server(engine, config).run()
