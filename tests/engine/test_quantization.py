"""An engine over a quantized base (--quantization): what the config and the resolve step refuse, and that
the rest of the engine (prefix caching, chunked prefill, mixed adapter batches) does not care how the
base's weights are stored (tiny random Llama, whose weights int8 and int4 really move)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_serve.bench.llama_shapes import arch_of
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.resolve import describe, resolve_config, resolve_quantization
from lora_serve.model.loader import random_model

from .helpers import run_to_completion
from .test_prefix_cache_engine import batch, logprob_gap, modules, peft, tokens

__all__ = ["peft"]  # the adapters' fixture, shared with the prefix caching tests
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "lora, field",
    [(dict(merge="a"), "merge"), (dict(merge_policy="auto"), "merge_policy")],
)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_merging_with_a_quantized_base_is_refused_by_the_config(lora: dict, field: str, scheme: str) -> None:
    with pytest.raises(ValueError, match=f"{field} needs a full-precision base"):
        EngineConfig(model=ModelConfig(quantization=scheme), lora=LoRAConfig(**lora))  # type: ignore[arg-type]


def test_quantization_off_cpu_is_refused_and_a_built_model_must_agree() -> None:
    with pytest.raises(ValueError, match="runs on CPU only"):
        resolve_quantization("int4", None, torch.device("cuda", 0))  # a device object only: no GPU is touched
    model = random_model(arch_of("tiny"), torch.float32, CPU, 64)
    model.quantize("int8")
    with pytest.raises(ValueError, match="quantization=int4 but the model was built with quantization int8"):
        resolve_config(EngineConfig(model=ModelConfig(quantization="int4")), model)
    resolved = resolve_config(EngineConfig(), model)
    assert resolved.model.quantization == "int8"
    assert "quantization=int8" in describe(resolved)
    assert "quantization=none" in describe(resolve_config(EngineConfig(), arch_of("tiny")))


def quantized_engine(base: Path, scheme: str, caching: bool = True, chunk: int | None = None, lora_modules=()) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(quantization=scheme),  # type: ignore[arg-type]
        cache=CacheConfig(kv_cache_memory_gb=0.01, block_size=8, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256, long_prefill_token_threshold=chunk),
        lora=LoRAConfig(max_loras=4, max_lora_rank=16, lora_modules=list(lora_modules)),
    )
    return LLMEngine.from_config(config, base)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prefix_caching_and_chunked_prefill_give_the_tokens_of_a_cold_whole_prefill(tiny_llama_dir: Path, peft, scheme: str):
    _, paths = peft
    reqs, lora = batch(3000)
    cold = run_to_completion(quantized_engine(tiny_llama_dir, scheme, caching=False, lora_modules=modules(paths)), reqs, lora)
    e = quantized_engine(tiny_llama_dir, scheme, lora_modules=modules(paths))
    run_to_completion(e, *batch(2000))  # fills the cache with the shared system prompt
    warm = run_to_completion(e, reqs, lora)
    assert all(r["cached_tokens"] == 40 for r in warm.values())
    assert tokens(warm) == tokens(cold) and logprob_gap(warm, cold) < 1e-4
    chunked = run_to_completion(quantized_engine(tiny_llama_dir, scheme, chunk=16, lora_modules=modules(paths)), reqs, lora)
    assert tokens(chunked) == tokens(cold) and logprob_gap(chunked, cold) < 1e-4


def test_the_start_line_says_when_quantized_steps_run_without_the_kernels() -> None:
    model = random_model(arch_of("tiny"), torch.float32, CPU, 64)
    model.quantize("int4")
    with_kernels = describe(resolve_config(EngineConfig(), model))
    without = describe(resolve_config(EngineConfig(model=ModelConfig(cpu_kernels="off")), model))
    assert "quantization=int4 (CPU kernels up to 64 rows" in with_kernels
    assert "quantization=int4 (no CPU kernels: every step dequantizes" in without
