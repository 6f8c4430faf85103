"""Which grammar library masks logits fastest on this machine: xgrammar, llguidance, outlines-core.

    .venv/bin/python -m lora_serve.bench.grammar_engines [--model .cache/models/SmolLM2-135M-Instruct]

For one JSON schema on the model's tokenizer, each library compiles the schema (first time, not
cached), then walks the tokens of a valid instance: the mask of allowed next tokens is filled
before each token is accepted, as the sampler does per constrained row. Reported: compile time,
and the median and p99 of the per-token mask time. A library that is not installed is skipped;
lora-serve depends on xgrammar only (structured_output.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines"],
    "address": {"city": "London", "zip": "W1"},
}

Walk = Callable[[list[int]], list[float]]  # the tokens to accept -> seconds per mask


def _xgrammar(tokenizer, vocab_size: int) -> tuple[float, Walk]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t0

    def walk(tokens: list[int]) -> list[float]:
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t), t
        return times

    return compile_s, walk


def _llguidance(tokenizer, vocab_size: int) -> tuple[float, Walk]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: the first mask is part of it
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
    compile_s = time.perf_counter() - t0

    def walk(tokens: list[int]) -> list[float]:
        m = llguidance.LLMatcher(lltok, grammar)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), m.get_error()
        return times

    return compile_s, walk


def _outlines_core(tokenizer, vocab_size: int) -> tuple[float, Walk]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab: dict[str, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i != tokenizer.eos_token_id:
            vocab.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(i)
    vocabulary = Vocabulary(tokenizer.eos_token_id, vocab)
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[\n ]{0,1}"), vocabulary)
    compile_s = time.perf_counter() - t0

    def walk(tokens: list[int]) -> list[float]:
        guide = Guide(index)
        mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            times.append(time.perf_counter() - t0)
            guide.advance(t)
        return times

    return compile_s, walk


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--repeats", type=int, default=5, help="walks of the instance per library")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab_size = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    print(f"{args.model.name}: {vocab_size} token ids; instance of {len(tokens)} tokens; torch threads {torch.get_num_threads()}")
    print(f"{'library':<14} {'compile ms':>10} {'mask us p50':>12} {'mask us p99':>12}")
    for name, build in LIBRARIES.items():
        try:
            compile_s, walk = build(tokenizer, vocab_size)
        except ImportError:
            print(f"{name:<14} not installed")
            continue
        times = sorted(t for _ in range(args.repeats) for t in walk(tokens))
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(f"{name:<14} {compile_s * 1e3:>10.1f} {statistics.median(times) * 1e6:>12.1f} {p99 * 1e6:>12.1f}")


if __name__ == "__main__":
    main()
