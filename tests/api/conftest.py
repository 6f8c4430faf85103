"""A real AsyncEngine on the tiny random Llama (package scope) and a live server per test module; the
embedded SmolLM2-135M-Instruct with a random adapter likewise, for what needs a model that answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import TINY_ADAPTERS, make_tiny_adapters
from tests.api.live_server import LiveServer, live_server
from tests.lora.conftest import make_peft_adapters

TINY_MAX_MODEL_LEN = 256  # small, so that context-length errors are cheap to provoke
EMBEDDED_ADAPTER = "smol-r8"  # a random rank-8 adapter of the embedded model (embedded_engine)


@pytest.fixture(scope="package")
def peft_paths(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny adapters (adapter_helpers.TINY_ADAPTERS) in PEFT's format, by name; read only."""
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))[1]


@pytest.fixture(scope="package")
def r4_versions(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Two versions of one adapter: (peft_model, r4-attn's folder, a folder of r4-attn with other weights)."""
    root = tmp_path_factory.mktemp("r4-versions")
    peft_model, paths = make_tiny_adapters(tiny_llama_dir, root / "v1", {"r4-attn": TINY_ADAPTERS["r4-attn"]})
    _, other = make_tiny_adapters(tiny_llama_dir, root / "v2", {"r4-attn": TINY_ADAPTERS["r4-attn"]}, seed=1)
    return peft_model, paths["r4-attn"], other["r4-attn"]


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


@pytest.fixture(scope="package")
def embedded_engine(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    """The embedded model, with EMBEDDED_ADAPTER registered (attention and MLP projections, PEFT's format)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter_config = {"r": 8, "lora_alpha": 16, "target_modules": targets}
    _, paths = make_peft_adapters(default_model_dir, tmp_path_factory.mktemp("smol"), {EMBEDDED_ADAPTER: adapter_config})
    config = EngineConfig(
        model=ModelConfig(model=str(default_model_dir)),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        scheduler=SchedulerConfig(max_model_len=1024),
        lora=LoRAConfig(adapter_dir=tmp_path_factory.mktemp("smol-store"), lora_modules=[f"{EMBEDDED_ADAPTER}={paths[EMBEDDED_ADAPTER]}"]),
    )
    engine = AsyncEngine.from_config(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def embedded_server(embedded_engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(embedded_engine, ServerConfig()) as live:
        yield live
