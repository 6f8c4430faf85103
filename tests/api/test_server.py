"""run_server: what the process does around uvicorn's loop."""

from __future__ import annotations

import gc

import uvicorn

from lora_serve.api.server import run_server
from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine


def test_the_start_up_heap_is_frozen_before_serving(tiny_engine: AsyncEngine, monkeypatch):
    """By the time uvicorn runs, start-up's objects (the engine's among them) are out of the collector's
    reach, and a full collection walks only what came after."""
    seen = {}

    def run(server: uvicorn.Server) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["engine_tracked"] = any(o is tiny_engine for o in gc.get_objects())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    gc.unfreeze()
    try:
        run_server(tiny_engine, ServerConfig(port=0))
    finally:
        gc.unfreeze()  # the rest of the suite runs with an ordinary heap
    assert seen["frozen"] > 0
    assert not seen["engine_tracked"]  # gc.get_objects() lists no frozen object
