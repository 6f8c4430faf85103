"""The sampling fields through the engine: one mixed batch against transformers' `generate`, and min_tokens' hold on stops."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams

from .conftest import make_engine
from .helpers import run_to_completion

NEW_TOKENS = 16
EOS = 2  # the tiny models' (tests/conftest.py)
PROMPT = [(11 * j) % 3000 + 40 for j in range(24)]

FAVOURED = 1234  # biased by 1.0, beyond the tiny model's logits (std 0.16): greedy repeats it until a penalty stops it
# Our fields -> the same request to transformers' generate (greedy); all run in one batch of the engine.
CASES = {
    "bias": ({"logit_bias": {FAVOURED: 1.0, 77: -100.0}}, {"sequence_bias": [[[FAVOURED], 1.0], [[77], -100.0]]}),
    "bias-then-repetition": (
        {"logit_bias": {FAVOURED: 1.0}, "repetition_penalty": 3.0},
        {"sequence_bias": [[[FAVOURED], 1.0]], "repetition_penalty": 3.0},
    ),
    "repetition-below-one": ({"repetition_penalty": 0.5}, {"repetition_penalty": 0.5}),
    "min-tokens": ({"min_tokens": 6, "logit_bias": {EOS: 100.0}}, {"min_new_tokens": 6, "sequence_bias": [[[EOS], 100.0]]}),
}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> LLMEngine:
    return make_engine(tiny_llama_dir)


def test_a_mixed_batch_matches_transformers_generate(engine: LLMEngine, tiny_llama_dir) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    requests = {name: (PROMPT, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, **ours)) for name, (ours, _) in CASES.items()}
    results = run_to_completion(engine, requests)
    plain = run_to_completion(engine, {"plain": (PROMPT, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))})["plain"]
    for name, (_, theirs) in CASES.items():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS, **theirs)
        assert results[name]["tokens"] == out[0, len(PROMPT) :].tolist(), name
    outputs = [plain["tokens"]] + [r["tokens"] for r in results.values()]
    assert len({tuple(tokens) for tokens in outputs}) == len(outputs), "each field changes the output, or checks nothing"
    assert results["bias"]["tokens"] == [FAVOURED] * NEW_TOKENS
    assert results["min-tokens"]["tokens"][6:] == [EOS] and results["min-tokens"]["finish_reason"] == "stop"


def test_min_tokens_holds_stop_token_ids_then_lets_them_stop(engine: LLMEngine) -> None:
    first = run_to_completion(engine, {"g": (PROMPT, SamplingParams(max_tokens=1, temperature=0))})["g"]["tokens"][0]
    stop = dict(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[first], logit_bias={first: 100.0})
    out = run_to_completion(engine, {"now": (PROMPT, SamplingParams(**stop)), "held": (PROMPT, SamplingParams(min_tokens=5, **stop))})
    assert (out["now"]["tokens"], out["now"]["finish_reason"]) == ([first], "stop")
    assert out["held"]["tokens"][5:] == [first] and first not in out["held"]["tokens"][:5]
    assert out["held"]["finish_reason"] == "stop"


def test_stop_strings_count_only_after_min_tokens(engine: LLMEngine) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    text = run_to_completion(engine, {"g": (PROMPT, greedy)})["g"]["text"]
    stop = text[:2]  # the output's own start: a stop there cuts everything
    kwargs = dict(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop])
    out = run_to_completion(engine, {"now": (PROMPT, SamplingParams(**kwargs)), "held": (PROMPT, SamplingParams(min_tokens=3, **kwargs))})
    assert out["now"]["text"] == "" and out["now"]["finish_reason"] == "stop"
    assert out["held"]["text"].startswith(stop) and len(out["held"]["tokens"]) > 3
