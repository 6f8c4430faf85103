"""lora-serve's LoRA math against HF PEFT on the embedded base (the independent reference)."""

from __future__ import annotations

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams

from ..engine.helpers import chat_ids, run_to_completion
from .conftest import ADAPTER_CONFIGS, make_peft_adapters
from .peft_reference import check_against, reference

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
TOP = 5
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "Say hello in one word."]


@pytest.fixture(scope="module")
def engine(default_model_dir, peft_adapters):
    _, paths = peft_adapters
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        lora=LoRAConfig(max_loras=4, max_cpu_loras=4, max_lora_rank=64, lora_modules=[f"{n}={p}" for n, p in paths.items()]),
    )
    return LLMEngine.from_config(config, default_model_dir)


def params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=TOP)


@pytest.mark.parametrize("adapter", list(ADAPTER_CONFIGS))
def test_each_adapter_alone_matches_peft(engine, peft_adapters, adapter):
    peft_model, _ = peft_adapters
    prompt = chat_ids(engine.tokenizer, PROMPTS[0])
    out = run_to_completion(engine, {"r": (prompt, params())}, {"r": adapter})["r"]
    ref_tokens, ref_rows = reference(peft_model, adapter, prompt, NEW_TOKENS)
    _, base_rows = reference(peft_model, None, prompt, 1)
    assert (ref_rows[0] - base_rows[0]).abs().max() > 0.05  # the adapter really changes the model
    check_against(out, ref_tokens, ref_rows)


def test_mixed_batch_each_sequence_gets_its_own_adapter(engine, peft_adapters):
    peft_model, _ = peft_adapters
    # Four adapters and the bare base, interleaved, more adapters than slots in flight overall.
    plan = [("r16-all", 0), (None, 0), ("r4-attn", 1), ("r8-mlp", 2), (None, 1), ("r16-all", 2), ("r8-rslora", 1)]
    reqs, lora = {}, {}
    for i, (adapter, p) in enumerate(plan):
        reqs[f"s{i}"] = (chat_ids(engine.tokenizer, PROMPTS[p]), params())
        lora[f"s{i}"] = adapter
    outs = run_to_completion(engine, reqs, lora)
    for i, (adapter, _p) in enumerate(plan):
        ref_tokens, ref_rows = reference(peft_model, adapter, reqs[f"s{i}"][0], NEW_TOKENS)
        check_against(outs[f"s{i}"], ref_tokens, ref_rows)


def test_base_rows_get_no_delta_when_sharing_a_batch_with_adapters(engine, peft_adapters):
    peft_model, _ = peft_adapters
    prompt = chat_ids(engine.tokenizer, PROMPTS[1])
    alone = run_to_completion(engine, {"b": (prompt, params())})["b"]
    reqs = {"b": (prompt, params()), **{f"a{i}": (prompt, params()) for i in range(3)}}
    mixed = run_to_completion(engine, reqs, {"a0": "r16-all", "a1": "r8-mlp", "a2": "r64-qv"})
    assert mixed["b"]["tokens"] == alone["tokens"]
    assert [lp.logprob for lp in mixed["b"]["logprobs"]] == pytest.approx([lp.logprob for lp in alone["logprobs"]], abs=1e-4)
    ref_tokens, ref_rows = reference(peft_model, None, prompt, NEW_TOKENS)
    check_against(alone, ref_tokens, ref_rows)


def test_a_then_b_then_a_gives_identical_output(engine):
    prompt = chat_ids(engine.tokenizer, PROMPTS[2])
    runs = []
    for name in ("r8-pattern", "r64-qv", "r8-pattern"):
        # Each run prefills the whole prompt: a cached prefix would change the step's shapes, and so the last
        # float bits, which this test must see unchanged (prefix caching has its own tests).
        engine.kv_cache.reset_prefix_cache()
        runs.append(run_to_completion(engine, {"x": (prompt, params())}, {"x": name})["x"])
    assert runs[0]["tokens"] == runs[2]["tokens"]
    assert [lp.logprob for lp in runs[0]["logprobs"]] == [lp.logprob for lp in runs[2]["logprobs"]]
    assert runs[0]["tokens"] != runs[1]["tokens"] or runs[0]["logprobs"][0].logprob != runs[1]["logprobs"][0].logprob


SAME_LAYOUT = {name: ADAPTER_CONFIGS["r16-all"] for name in ("same-a", "same-b", "same-c")}


@pytest.fixture(scope="module")
def same_layout(default_model_dir, tmp_path_factory):
    """Three different adapters with one layout: their decode rows run as batched matmuls."""
    peft_model, paths = make_peft_adapters(default_model_dir, tmp_path_factory.mktemp("same"), SAME_LAYOUT, seed=1)
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        lora=LoRAConfig(max_loras=4, max_cpu_loras=4, max_lora_rank=16, lora_modules=[f"{n}={p}" for n, p in paths.items()]),
    )
    return peft_model, LLMEngine.from_config(config, default_model_dir)


@pytest.mark.parametrize(
    "plan",
    [["same-a", "same-b", "same-c"], ["same-a", "same-b", None, "same-a", "same-c", "same-a"]],
    ids=["one-row-per-adapter", "several-rows-per-adapter"],
)
def test_same_layout_adapters_batched_together_match_peft(same_layout, plan):
    peft_model, engine = same_layout
    reqs = {f"s{i}": (chat_ids(engine.tokenizer, PROMPTS[i % len(PROMPTS)]), params()) for i in range(len(plan))}
    outs = run_to_completion(engine, reqs, {f"s{i}": a for i, a in enumerate(plan)})
    for i, adapter in enumerate(plan):
        ref_tokens, ref_rows = reference(peft_model, adapter, reqs[f"s{i}"][0], NEW_TOKENS)
        check_against(outs[f"s{i}"], ref_tokens, ref_rows)
