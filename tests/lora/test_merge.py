"""Merged mode: exact unmerge, correct mixed batches while merged, switches mid-stream, the auto policy."""

from __future__ import annotations

import pytest
import torch

from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.model.arch import ModelArch

from ..engine.helpers import chat_ids, run_to_completion
from .peft_reference import check_against, reference
from .test_peft_parity import params

PROMPT = list(range(700, 740))


def tiny_engine(tiny_llama_dir, tmp_path, dtype="float32", **lora) -> LLMEngine:
    arch = ModelArch.from_dir(tiny_llama_dir)
    mods = [f"t{i}={write_random_adapter(tmp_path / f't{i}', arch, rank=4 + 4 * i, seed=i, alpha=32.0)}" for i in range(3)]
    config = EngineConfig(
        model=ModelConfig(dtype=dtype),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256),
        lora=LoRAConfig(max_loras=4, max_lora_rank=16, lora_modules=mods, **lora),
    )
    return LLMEngine.from_config(config, tiny_llama_dir)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_100_merge_unmerge_cycles_restore_every_weight_bit_for_bit(tiny_llama_dir, tmp_path, dtype):
    engine = tiny_engine(tiny_llama_dir, tmp_path, dtype)
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for i in range(100):
        engine.merge_adapter(f"t{i % 3}")  # merging another first unmerges the current one
        if i % 2:
            engine.unmerge_adapter()
    engine.unmerge_adapter()
    changed = [k for k, v in engine.model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed == []


def test_merge_really_changes_the_weights_and_reports_it(tiny_llama_dir, tmp_path):
    engine = tiny_engine(tiny_llama_dir, tmp_path)
    before = engine.model.layers[0].self_attn.qkv_proj.weight.clone()
    engine.merge_adapter("t1")
    assert engine.adapters.merged_name == "t1"
    assert not torch.equal(engine.model.layers[0].self_attn.qkv_proj.weight, before)
    engine.unmerge_adapter()
    assert engine.adapters.merged_name is None


def test_switching_while_streams_run_gives_the_undisturbed_tokens(tiny_llama_dir, tmp_path):
    plan = {"b": None, "x": "t0", "y": "t1", "z": "t0", "w": "t2"}
    reqs = {rid: (PROMPT[: 20 + 3 * i], greedy(30)) for i, rid in enumerate(plan)}
    undisturbed = run_to_completion(tiny_engine(tiny_llama_dir, tmp_path / "u"), reqs, plan)
    engine = tiny_engine(tiny_llama_dir, tmp_path / "s")
    for rid, (prompt, p) in reqs.items():
        engine.add_request(rid, prompt, p, plan[rid])
    tokens = {rid: [] for rid in plan}
    switches = {
        3: lambda: engine.merge_adapter("t0"),
        9: lambda: engine.merge_adapter("t1"),
        15: engine.unmerge_adapter,
        21: lambda: engine.merge_adapter("t2"),
    }
    step = 0
    while engine.has_unfinished():
        if step in switches:
            switches[step]()  # between two steps, as the server does it
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    assert engine.adapters.merged_name == "t2"
    for rid in plan:
        assert tokens[rid] == undisturbed[rid]["tokens"], rid


def test_auto_policy_merges_under_skew_and_unmerges_when_it_goes(tiny_llama_dir, tmp_path):
    engine = tiny_engine(
        tiny_llama_dir,
        tmp_path,
        merge_policy="auto",
        merge_threshold=0.8,
        unmerge_threshold=0.5,
        merge_window_steps=4,
        merge_interval_steps=6,
    )
    history = []

    def run(loras: list[str | None], steps: int) -> None:
        for i, lora in enumerate(loras):
            engine.add_request(f"{len(history)}-{i}", PROMPT[:10], greedy(steps), lora)
        for _ in range(steps):
            engine.step()
            history.append(engine.adapters.merged_name)
        assert not engine.has_unfinished()

    run(["t1"] * 9 + [None], 12)  # 90% of the tokens on t1
    assert history[:3] == [None, None, None]  # needs a full window first
    assert history[-1] == "t1" and engine.merge_policy.decisions["merge"] == 1
    run(["t0", "t2", None, "t1"], 12)  # t1 down to 25%
    assert history[-1] is None and engine.merge_policy.decisions["unmerge"] == 1
    assert "share" in engine.merge_policy.last.reason
    run(["t2", "t0", None, "t1"], 12)  # no adapter dominates: stays unmerged
    assert engine.adapters.merged_name is None and engine.merge_policy.decisions["merge"] == 1


@pytest.mark.slow
def test_merged_equals_peft_for_it_and_mixed_batch_stays_correct(default_model_dir, peft_adapters):
    peft_model, paths = peft_adapters
    names = ["r16-all", "r4-attn", "r8-mlp"]
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        lora=LoRAConfig(max_loras=4, max_lora_rank=64, lora_modules=[f"{n}={paths[n]}" for n in names], merge="r16-all"),
    )
    engine = LLMEngine.from_config(config, default_model_dir)
    assert engine.adapters.merged_name == "r16-all"
    prompt = chat_ids(engine.tokenizer, "What is the capital of France?")
    plan = {"merged": "r16-all", "base": None, "other1": "r4-attn", "other2": "r8-mlp"}
    outs = run_to_completion(engine, {rid: (prompt, params()) for rid in plan}, plan)
    for rid, adapter in plan.items():
        ref_tokens, ref_rows = reference(peft_model, adapter, prompt, len(outs[rid]["tokens"]))
        check_against(outs[rid], ref_tokens, ref_rows)
