"""Weighted composition and per-request scale, unmerged in a mixed batch, against PEFT's add_weighted_adapter("cat")."""

from __future__ import annotations

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.composition import Composition

from ..engine.helpers import chat_ids, run_to_completion
from .peft_reference import check_against, reference

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "Say hello in one word."]
COMPOSED = {"r16-all": 0.7, "r8-mlp": 0.5}
SCALED = {"r4-attn": 0.5}


def _peft_name(weights: dict[str, float]) -> str:
    return "composed-" + "_".join(f"{n}x{w}".replace(".", "p").replace("-", "m") for n, w in weights.items())


@pytest.fixture(scope="module")
def setup(default_model_dir, peft_adapters):
    peft_model, paths = peft_adapters
    for weights in (COMPOSED, SCALED, {"r16-all": -0.6}):
        name = _peft_name(weights)
        if name not in peft_model.peft_config:
            peft_model.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type="cat")
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        lora=LoRAConfig(max_loras=4, max_cpu_loras=6, max_lora_rank=64, lora_modules=[f"{n}={p}" for n, p in paths.items()]),
    )
    return peft_model, LLMEngine.from_config(config, default_model_dir)


def params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)


# (what the request names, the PEFT adapter that is its reference: None for the base)
MIXED = [
    (Composition.of(COMPOSED), _peft_name(COMPOSED)),
    ("r64-qv", "r64-qv"),
    (Composition.of(SCALED), _peft_name(SCALED)),
    (None, None),
    (Composition.of(COMPOSED), _peft_name(COMPOSED)),
    (Composition.of({"r16-all": -0.6}), _peft_name({"r16-all": -0.6})),
    ("r16-all", "r16-all"),
]


def _run_mixed(engine):
    reqs = {f"s{i}": (chat_ids(engine.tokenizer, PROMPTS[i % len(PROMPTS)]), params()) for i in range(len(MIXED))}
    engine.kv_cache.reset_prefix_cache()
    return reqs, run_to_completion(engine, reqs, {f"s{i}": lora for i, (lora, _) in enumerate(MIXED)})


def test_composition_and_scale_in_one_mixed_batch_match_peft(setup):
    peft_model, engine = setup
    reqs, outs = _run_mixed(engine)
    for i, (_, ref) in enumerate(MIXED):
        ref_tokens, ref_rows = reference(peft_model, ref, reqs[f"s{i}"][0], NEW_TOKENS)
        check_against(outs[f"s{i}"], ref_tokens, ref_rows)
    # The references differ from one another: a composition is not one of its parts.
    first = {ref: reference(peft_model, ref, reqs["s0"][0], 1)[1][0] for ref in (_peft_name(COMPOSED), "r16-all", "r8-mlp")}
    assert (first[_peft_name(COMPOSED)] - first["r16-all"]).abs().max() > 0.05
    assert (first[_peft_name(COMPOSED)] - first["r8-mlp"]).abs().max() > 0.05
    residency = engine.lora.residency
    assert residency.num_virtual() == 0 and residency.num_pins() == 0  # freed with the last row that used them


def test_composition_with_an_adapter_merged_matches_peft(setup):
    peft_model, engine = setup
    engine.merge_adapter("r8-mlp")  # one of the composition's parts
    try:
        reqs, outs = _run_mixed(engine)
    finally:
        engine.unmerge_adapter()
    for i, (_, ref) in enumerate(MIXED):
        ref_tokens, ref_rows = reference(peft_model, ref, reqs[f"s{i}"][0], NEW_TOKENS)
        check_against(outs[f"s{i}"], ref_tokens, ref_rows)


def test_one_adapter_at_weight_one_is_the_adapter(setup):
    _, engine = setup
    prompt = chat_ids(engine.tokenizer, PROMPTS[1])
    engine.kv_cache.reset_prefix_cache()
    plain = run_to_completion(engine, {"x": (prompt, params())}, {"x": "r4-attn"})["x"]
    engine.kv_cache.reset_prefix_cache()
    named = run_to_completion(engine, {"x": (prompt, params())}, {"x": Composition.of({"r4-attn": 1.0})})["x"]
    assert named["tokens"] == plain["tokens"]
    assert [lp.logprob for lp in named["logprobs"]] == [lp.logprob for lp in plain["logprobs"]]


def test_more_components_than_max_loras_is_refused_and_holds_nothing(setup):
    _, engine = setup
    names = ["r4-attn", "r8-mlp", "r16-all", "r64-qv", "r8-rslora"]
    with pytest.raises(ValueError, match="max_loras"):
        engine.add_request("big", [1, 2, 3], params(), Composition.of(dict.fromkeys(names, 0.5)))
    assert all(engine.adapters.num_refs(n) == 0 for n in names)
    assert not engine.has_unfinished()
