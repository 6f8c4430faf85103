"""The embedded SmolLM2-135M-Instruct answers a factual question through the API (greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import live_server


@pytest.mark.slow
def test_capital_of_france(default_model_dir: Path) -> None:
    config = EngineConfig(
        model=ModelConfig(model=str(default_model_dir)),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        scheduler=SchedulerConfig(max_model_len=1024),
    )
    engine = AsyncEngine.from_config(config)
    try:
        with live_server(engine, ServerConfig()) as server:
            assert server.model == "SmolLM2-135M-Instruct"
            resp = server.client().chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0,
                max_tokens=30,
            )
    finally:
        engine.shutdown()
    assert "Paris" in resp.choices[0].message.content
