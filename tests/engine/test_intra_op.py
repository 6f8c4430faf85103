"""The engine thread keeps the CPU threads of torch ops; threads that start using torch later get one (engine/intra_op.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.engine.intra_op import run_at_threads, run_on_own_thread
from lora_serve.engine.llm_engine import LLMEngine


def _fail() -> None:
    raise ValueError("from the other thread")


def test_run_on_own_thread_returns_its_result_and_raises_its_error() -> None:
    assert run_on_own_thread(lambda: threading.current_thread().name, "lora-serve-test") == "lora-serve-test"
    with pytest.raises(ValueError, match="from the other thread"):
        run_on_own_thread(_fail, "lora-serve-test")


def test_run_at_threads_runs_at_that_count_and_leaves_the_callers_and_the_default_as_they_were() -> None:
    default = run_on_own_thread(torch.get_num_threads, "lora-serve-test")

    def on_one_thread() -> tuple[int, int, int]:
        torch.set_num_threads(1)  # this thread's count, and the process default, are now 1
        inside = run_at_threads(2, torch.get_num_threads, "lora-serve-test")
        return inside, torch.get_num_threads(), run_on_own_thread(torch.get_num_threads, "lora-serve-test")

    try:
        assert run_on_own_thread(on_one_thread, "lora-serve-test") == (2, 1, 1)
    finally:
        run_on_own_thread(lambda: torch.set_num_threads(default), "lora-serve-test")


def test_the_model_loads_on_a_thread_that_ends_and_the_engine_thread_keeps_its_count(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaders: list[threading.Thread] = []
    load = LLMEngine.from_config

    def recording_load(*args, **kwargs) -> LLMEngine:
        loaders.append(threading.current_thread())
        return load(*args, **kwargs)

    monkeypatch.setattr(LLMEngine, "from_config", recording_load)
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", num_threads=2),
        cache=CacheConfig(kv_cache_memory_gb=0.01),
        scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=128),
    )
    engine = AsyncEngine.from_config(config)
    try:
        # OpenMP keeps a pool of workers per thread that ran parallel ops: the loader's end with it.
        assert [t.name for t in loaders] == ["lora-serve-load"]
        assert loaders[0] is not threading.current_thread() and not loaders[0].is_alive()
        assert asyncio.run(engine.call(torch.get_num_threads)) == 2
        assert run_on_own_thread(torch.get_num_threads, "lora-serve-test") == 1  # a thread new to torch
    finally:
        engine.shutdown()
