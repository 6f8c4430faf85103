"""Structured outputs in the engine: constrained rows follow their grammar, unconstrained rows of the same
batch are untouched, a complete grammar ends its sequence, and preemption keeps the matcher right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from lora_serve.engine.grammar import GrammarCompiler, GrammarSpec
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams

from .conftest import make_engine
from .helpers import run_to_completion

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "colour"],
}
PROMPTS = [[(7 * i + j) % 3000 + 40 for j in range(12 + 5 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return make_engine(tiny_llama_dir)


def compile_spec(engine: LLMEngine, kind, value: str = ""):
    assert engine.grammar_compiler is not None
    return engine.grammar_compiler.compile(GrammarSpec(kind, value))


def test_a_constrained_row_leaves_the_unconstrained_rows_of_its_batch_alone(engine: LLMEngine) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    alone = run_to_completion(engine, {f"u{i}": (p, greedy) for i, p in enumerate(PROMPTS[:3])})
    constrained = {
        "json": (PROMPTS[3], SamplingParams(max_tokens=40, temperature=0, grammar=compile_spec(engine, "json_schema", json.dumps(SCHEMA)))),
        "drawn": (PROMPTS[0], SamplingParams(max_tokens=40, temperature=1.0, seed=7, grammar=compile_spec(engine, "regex", "(yes|no)"))),
    }
    mixed = run_to_completion(engine, {**{f"u{i}": (p, greedy) for i, p in enumerate(PROMPTS[:3])}, **constrained})
    for rid in alone:
        assert mixed[rid]["tokens"] == alone[rid]["tokens"], rid
        got = [lp.logprob for lp in mixed[rid]["logprobs"]]
        assert got == pytest.approx([lp.logprob for lp in alone[rid]["logprobs"]], abs=1e-5)
    jsonschema.validate(json.loads(mixed["json"]["text"]), SCHEMA)
    assert mixed["json"]["finish_reason"] == "stop"
    assert mixed["drawn"]["text"] in ("yes", "no") and mixed["drawn"]["finish_reason"] == "stop"


def test_a_complete_grammar_ends_the_sequence_even_with_ignore_eos(engine: LLMEngine) -> None:
    params = SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, min_tokens=20, grammar=compile_spec(engine, "choice", '["alpha", "beta"]')
    )
    out = run_to_completion(engine, {"c": (PROMPTS[1], params)})["c"]
    assert out["text"] in ("alpha", "beta")
    assert out["finish_reason"] == "stop" and len(out["tokens"]) < 30
    assert out["tokens"][-1] in engine.eos_token_ids  # the grammar's end is EOS, which the text leaves out


def test_the_logprobs_of_a_constrained_row_are_the_models_own(engine: LLMEngine) -> None:
    """The mask chooses the token; the logprob reported for it is that of the raw distribution, as without a grammar."""
    grammar = compile_spec(engine, "regex", "z{8}")
    constrained = run_to_completion(
        engine, {"c": (PROMPTS[2], SamplingParams(max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, grammar=grammar))}
    )["c"]
    forced = constrained["tokens"][:-1]  # z's, then EOS
    free = run_to_completion(engine, {"f": (PROMPTS[2], SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=3))})["f"]
    assert constrained["text"] == "z" * 8 and forced
    first = constrained["logprobs"][0]
    (ids, values), (free_ids, free_values) = zip(*first.top), zip(*free["logprobs"][0].top)
    assert ids == free_ids and values == pytest.approx(free_values, abs=1e-5)  # the same distribution
    if forced[0] != free["tokens"][0]:
        assert first.logprob < free["logprobs"][0].logprob


def test_preempted_constrained_sequences_resume_their_grammar(tiny_llama_dir: Path) -> None:
    """Preemption frees the blocks but keeps the output tokens, which the matcher has accepted: the recomputed
    sequence goes on where it was, with the tokens of a roomy run."""
    pattern = "[0-9a-f]{40}"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    roomy_engine = make_engine(tiny_llama_dir)
    compiler = GrammarCompiler(tok, roomy_engine.arch.vocab_size, roomy_engine.eos_token_ids)
    reqs = {
        f"p{i}": (p * 2, SamplingParams(max_tokens=60, temperature=0, grammar=compiler.compile(GrammarSpec("regex", pattern))))
        for i, p in enumerate(PROMPTS)
    }
    roomy = run_to_completion(roomy_engine, reqs)
    tight_engine = make_engine(tiny_llama_dir, kv_gb=136 * 512 / 2**30, max_num_seqs=8, block_size=8, max_model_len=128)
    tight = run_to_completion(tight_engine, reqs)
    assert tight_engine.scheduler.num_preemptions > 0
    for rid in reqs:
        assert re.fullmatch(pattern, tight[rid]["text"]), tight[rid]["text"]
        assert tight[rid]["tokens"] == roomy[rid]["tokens"] and tight[rid]["finish_reason"] == "stop", rid


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        ("json_schema", '{"type": "nope"}', "Unsupported type"),
        ("json_schema", "{not json", "Failed to parse JSON"),
        ("regex", "(ab", "parenthesis"),
        ("grammar", "root ::= (", "EBNF"),
    ],
)
def test_what_cannot_compile_is_a_value_error(engine: LLMEngine, kind, value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        compile_spec(engine, kind, value)
