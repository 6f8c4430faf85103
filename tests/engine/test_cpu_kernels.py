"""The engine on the CPU kernels (model/cpu_kernels.c) gives torch's tokens, and runs without them."""

from __future__ import annotations

import logging

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.model import cpu_kernels as ck

from ..lora.conftest import ADAPTER_CONFIGS, make_peft_adapters
from .helpers import chat_ids, run_to_completion

PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "Say hello in one word.", "Count to five."]
ADAPTERS = {name: ADAPTER_CONFIGS[name] for name in ("r16-all", "r4-attn", "r8-mlp")}


def engine(model_dir, cpu_kernels: str, lora_dtype: str = "float32", modules: list[str] | None = None) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(cpu_kernels=cpu_kernels),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.1),
        lora=LoRAConfig(max_lora_rank=16, lora_dtype=lora_dtype, lora_modules=modules or []),  # type: ignore[arg-type]
    )
    return LLMEngine.from_config(config, model_dir)


@pytest.mark.slow
def test_kernels_and_torch_give_the_same_tokens_and_logprobs_for_base_and_mixed_adapters(default_model_dir, tmp_path, kernels):
    _, paths = make_peft_adapters(default_model_dir, tmp_path, ADAPTERS)
    modules = [f"{n}={p}" for n, p in paths.items()]
    on, off = engine(default_model_dir, "on", modules=modules), engine(default_model_dir, "off", modules=modules)
    assert on.model.kernels is not None and off.model.kernels is None
    # A mixed batch: base rows and three adapters, decode rows batched (the grouped path) and alone.
    plan = [None, "r16-all", "r4-attn", "r8-mlp", None, "r16-all", "r4-attn", "r8-mlp"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    reqs = {f"s{i}": (chat_ids(on.tokenizer, PROMPTS[i % len(PROMPTS)]), params) for i in range(len(plan))}
    loras = {f"s{i}": a for i, a in enumerate(plan)}
    got, want = run_to_completion(on, reqs, loras), run_to_completion(off, reqs, loras)
    for rid in reqs:
        assert got[rid]["tokens"] == want[rid]["tokens"], rid
        assert [lp.logprob for lp in got[rid]["logprobs"]] == pytest.approx([lp.logprob for lp in want[rid]["logprobs"]], abs=1e-4)


def test_without_a_compiler_the_engine_serves_on_torch_and_says_why(tiny_llama_dir, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LORA_SERVE_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    ck._load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="lora_serve"):
            e = engine(tiny_llama_dir, "auto", lora_dtype="auto")
        assert e.config.model.cpu_kernels == "off" and e.model.kernels is None
        assert e.config.lora.lora_dtype == "float32"
        assert any("cpu_kernels=off (" in r.getMessage() and "slower for small batches" in r.getMessage() for r in caplog.records)
        out = run_to_completion(e, {"r": ([1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))})
        assert len(out["r"]["tokens"]) == 5
        with pytest.raises(ValueError, match="cpu_kernels=on was asked for"):
            engine(tiny_llama_dir, "on")
    finally:
        ck._load.cache_clear()
