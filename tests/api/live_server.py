"""A real uvicorn server on a background thread, bound to a free 127.0.0.1 port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
from fastapi import FastAPI

from lora_serve.api.server import build_server
from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine


@dataclass
class LiveServer:
    engine: AsyncEngine
    base_url: str  # http://127.0.0.1:<port>
    model: str  # the base model's id in the API
    app: FastAPI | None = None  # the app in the server, for tests that read its state

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)


@contextmanager
def live_server(engine: AsyncEngine, config: ServerConfig) -> Iterator[LiveServer]:
    server = build_server(engine, config.model_copy(update={"host": "127.0.0.1", "port": 0}))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    model = config.served_model_name or engine.model_path.name
    try:
        yield LiveServer(engine, f"http://127.0.0.1:{port}", model, server.config.app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
