"""A real AsyncEngine on the tiny random Llama (package scope) and a live server per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import make_tiny_adapters
from tests.api.live_server import LiveServer, live_server

TINY_MAX_MODEL_LEN = 256  # small, so that context-length errors are cheap to provoke


@pytest.fixture(scope="package")
def peft_paths(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny adapters (adapter_helpers.TINY_ADAPTERS) in PEFT's format, by name; read only."""
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))[1]


@pytest.fixture(scope="package")
def tiny_engine(tiny_llama_dir: Path) -> Iterator[AsyncEngine]:
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=TINY_MAX_MODEL_LEN),
    )
    engine = AsyncEngine.from_config(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(tiny_engine, ServerConfig(served_model_name="tiny")) as live:
        yield live
