"""A request's output grammar: compiled once, off the engine thread; matched token by token on it.

The grammar library is xgrammar (vLLM's default), chosen by measurement on this machine: a JSON
schema compiles in about 7 ms and fills a 49152-id mask in about 5 us per token, against 16 us for
llguidance and 53 us for outlines-core (docs/benchmarks.md, lora_serve/bench/grammar_engines.py).

    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)   # one per engine
    grammar = compiler.compile(GrammarSpec("json_schema", schema_text))  # blocking: run it off the event loop
    SamplingParams(grammar=grammar)                                     # each sequence gets its own matcher

The compiler keeps xgrammar's cache, so a schema repeated across requests compiles once. The lm_head
may have more ids than the tokenizer: the tokenizer info is built for the lm_head's vocab_size, so
the ids past the tokenizer's are never allowed. The grammar ends on one of the engine's EOS ids,
which is then the only token a complete grammar allows.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Set
from dataclasses import dataclass
from typing import Literal

import xgrammar as xgr

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
# xgrammar's C++ errors start with a timestamp and a source location: "[14:31:06] /project/cpp/x.cc:94: ".
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match, before compilation."""

    kind: GrammarKind
    value: str = ""
    """json_schema: the schema as JSON text; regex: the pattern; choice: a JSON list of the strings;
    grammar: EBNF (GBNF) with a `root` rule; json_object: unused (any JSON object)."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar, shared by every sequence that asks for it; each gets its own matcher."""

    spec: GrammarSpec
    compiled: xgr.CompiledGrammar

    def matcher(self) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compiled)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings (JSON string literals are valid EBNF ones)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer; thread-safe, built on first use (the tokenizer
    info takes ~0.15 s for 49152 ids)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> Grammar:
        """Blocking. ValueError with the library's reason for a schema, regex or grammar it cannot compile."""
        compiler = self._xgr_compiler()
        try:
            if spec.kind == "json_schema":
                compiled = compiler.compile_json_schema(spec.value, any_whitespace=False)
            elif spec.kind == "json_object":  # OpenAI's json_object: an object, any keys
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.value)
            elif spec.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            else:
                compiled = compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's native checks raise RuntimeError
            raise ValueError(_NATIVE_PREFIX.sub("", str(exc)).strip()) from exc
        return Grammar(spec, compiled)
