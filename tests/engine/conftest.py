from __future__ import annotations

from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine


def make_engine(path: Path, kv_gb: float = 0.05, max_num_seqs: int = 64, block_size: int = 16, max_model_len: int = 512) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=kv_gb, block_size=block_size),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len),
    )
    return LLMEngine.from_config(config, path)


@pytest.fixture(scope="session")
def default_engine(default_model_dir: Path) -> LLMEngine:
    config = EngineConfig(scheduler=SchedulerConfig(max_model_len=1024), cache=CacheConfig(kv_cache_memory_gb=0.5))
    return LLMEngine.from_config(config, default_model_dir)


@pytest.fixture(scope="session")
def hf_default(default_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
