"""A live server with a quantized base (--quantization): base and adapter requests through the openai
client, each the engine's own greedy answer; merge refused in the OpenAI error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.model.quantized_weight import QuantizedWeight
from tests.api.adapter_helpers import ADMIN, MAX_RANK, admin_headers, make_tiny_adapters
from tests.api.live_server import LiveServer, live_server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["int8", "int4"])
def server(request, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", quantization=request.param),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256),
        lora=LoRAConfig(
            adapter_dir=tmp_path_factory.mktemp("store"),
            max_lora_rank=MAX_RANK,
            lora_modules=[f"{name}={path}" for name, path in paths.items()],
        ),
    )
    engine = AsyncEngine.from_config(config)
    try:
        with live_server(engine, ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)) as live:
            yield live
    finally:
        engine.shutdown()


def complete(server: LiveServer, model: str) -> list[str]:
    r = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.tokens is not None
    return r.choices[0].logprobs.tokens


def test_the_server_serves_base_and_adapters_on_the_quantized_base(server: LiveServer) -> None:
    assert server.engine.engine.model.quantization == server.engine.engine.config.model.quantization
    assert all(isinstance(lin.weight, QuantizedWeight) for lin in server.engine.engine.model.linears().values())
    models = [m.id for m in server.client().models.list().data]
    adapters = [m for m in models if m != "tiny"]
    assert "tiny" in models and adapters
    base = complete(server, "tiny")
    assert len(base) == 6
    assert any(complete(server, name) != base for name in adapters)  # the full-precision deltas still apply


def test_merge_is_refused_with_409_and_nothing_changes(server: LiveServer) -> None:
    name = next(m.id for m in server.client().models.list().data if m.id != "tiny")
    before = complete(server, name)
    r = httpx.post(f"{server.base_url}/v1/adapters/{name}/merge", headers=admin_headers(ADMIN), timeout=60)
    assert r.status_code == 409
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "base_quantized" and "quantized" in error["message"]
    assert server.engine.adapters.merged_name is None
    assert complete(server, name) == before
