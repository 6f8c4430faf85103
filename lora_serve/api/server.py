"""The FastAPI app factory and the uvicorn runner.

app = build_app(engine, ServerConfig(...))   # routes only translate; the engine does the work
run_server(engine, ServerConfig(...))        # blocks until Ctrl-C; leaves the engine to its owner
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import uvicorn
from fastapi import APIRouter, Depends, FastAPI

from lora_serve import __version__
from lora_serve.api import adapters, chat, completions, info, tokenize
from lora_serve.api.access_log import AccessLog
from lora_serve.api.auth import require_admin_key, require_api_key, require_metrics_key, require_tenant_key
from lora_serve.api.body_limit import BodyLimit
from lora_serve.api.errors import install_error_handlers
from lora_serve.api.header_timeout import HeaderTimeoutProtocol
from lora_serve.api.quota import UploadQuota
from lora_serve.api.state import ServerState
from lora_serve.api.upload import UPLOAD_ROUTE
from lora_serve.config import ServerConfig

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    docs = config.serves_docs
    log.info("API docs (/docs, /redoc, /openapi.json): %s", "served" if docs else "off")
    app = FastAPI(
        title="lora-serve",
        version=__version__,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,  # app.openapi() still builds the schema
    )
    base_name = config.served_model_name or engine.base_name
    admin = adapters.AdapterAdmin(engine, base_name)
    app.state.adapter_admin = admin
    app.state.upload_quota = UploadQuota(admin.store, config.max_adapters_per_tenant, config.max_adapter_bytes_per_tenant)
    app.state.lora_serve = ServerState.create(engine, config, admin.owner_of)
    admin.forget = app.state.lora_serve.metrics.forget
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])
    v1.include_router(chat.router)
    v1.include_router(completions.router)
    v1.include_router(info.v1_router)
    app.include_router(v1)
    app.include_router(tokenize.router, dependencies=[Depends(require_api_key)], tags=["vllm"])  # vLLM serves them outside /v1
    # Management needs a management key (not the user key), so its routers are apart, tagged apart:
    # tenants manage their own uploads; merging and loading by path change everyone's model.
    tenant = APIRouter(prefix="/v1", dependencies=[Depends(require_tenant_key)], tags=["admin"])
    tenant.include_router(adapters.router)
    app.include_router(tenant)
    admin_only = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)], tags=["admin"])
    admin_only.include_router(adapters.admin_router)
    app.include_router(admin_only)
    app.include_router(info.open_router)
    app.include_router(info.metrics_router, dependencies=[Depends(require_metrics_key)])
    install_error_handlers(app)
    # Uploads stream under their own, larger limit (max_adapter_bytes); every other body is small JSON.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, exempt={UPLOAD_ROUTE}, timeout_s=config.body_timeout_s)
    if config.access_log:
        app.add_middleware(AccessLog)  # outermost: it sees the 413s too
    return app


def build_server(engine: AsyncEngine, config: ServerConfig) -> uvicorn.Server:
    """A uvicorn server for the app; `.run()` blocks, tests run it on a thread and set `.should_exit`.

    On SIGTERM/SIGINT (or `.should_exit`) uvicorn stops accepting, lets open responses finish
    for up to shutdown_grace_s, then cancels them (which aborts their sequences). Slow clients:
    header_timeout_s here (uvicorn has no such timer), body_timeout_s in BodyLimit; uvicorn's own
    timeout_keep_alive (5 s) closes idle kept-alive connections.
    """
    app = build_app(engine, config)
    http = "auto" if config.header_timeout_s is None else HeaderTimeoutProtocol.with_timeout(config.header_timeout_s)
    # log_config=None keeps the caller's logging setup; access_log=False: ours (access_log.py) replaces uvicorn's.
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=http,
        log_config=None,
        access_log=False,
        # uvicorn annotates int, but hands it to asyncio.wait_for, which takes any number of seconds.
        timeout_graceful_shutdown=config.shutdown_grace_s,  # type: ignore[arg-type]
    )
    return uvicorn.Server(uv_config)


def run_server(engine: AsyncEngine, config: ServerConfig) -> None:
    server = build_server(engine, config)
    freeze_startup_heap()
    server.run()


def freeze_startup_heap() -> None:
    """Put what start-up made (the model's modules, the tokenizer, the registered adapters' records) out of
    the cyclic collector's reach. A full collection walks every tracked object, on whichever thread
    allocates, the engine's included, and stalls it meanwhile: 16 streams on adapters with 100 registered,
    SmolLM2-135M, 2-vCPU EPYC, one 259 ms pause in 96 steps, and 2 ms at most frozen (docs/benchmarks.md,
    "Adapter loads and the collector's pauses"). What serving allocates later is collected as before;
    frozen objects are still freed when their last reference goes (only cycles among them would stay)."""
    gc.collect()
    gc.freeze()
