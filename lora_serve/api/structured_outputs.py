"""Structured outputs: the request fields that constrain the output, turned into one engine GrammarSpec.

OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `strict`) and vLLM's extensions,
the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and the newer
`structured_outputs: {json | regex | choice | grammar | json_object}`. At most one may constrain a
request. The grammar is compiled on a worker thread (never on the event loop, never on the engine
thread), with the compiler's cache, before the request reaches the engine; what cannot compile is a
400 naming the field. `guided_grammar` is EBNF (GBNF) with a `root` rule, as xgrammar reads it.
A JSON schema is followed strictly (no properties beyond those it names), with or without `strict`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lora_serve.api.errors import invalid_param
from lora_serve.api.protocol_base import RequestBody
from lora_serve.engine.grammar import GrammarSpec

Schema = dict[str, Any] | str  # a JSON schema, as an object or as its JSON text


class JsonSchemaFormat(RequestBody):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The output's JSON schema (OpenAI's `schema`; `{}` allows any JSON value)."""

    strict: bool | None = None
    """Accepted; the schema is always followed strictly."""


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema: {"name", "schema", "strict"}')
        return self


class StructuredOutputsParams(RequestBody):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    json_: Schema | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class StructuredOutputFields(RequestBody):
    """The fields of chat and completions requests that constrain the output (module docstring)."""

    response_format: ResponseFormat | None = None
    """OpenAI: `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`."""

    guided_json: Schema | None = None
    """Extension (vLLM): the output is JSON valid against this schema."""

    guided_regex: str | None = None
    """Extension (vLLM): the output matches this regular expression."""

    guided_choice: list[str] | None = Field(None, min_length=1)
    """Extension (vLLM): the output is one of these strings."""

    guided_grammar: str | None = None
    """Extension (vLLM): the output follows this EBNF grammar (GBNF, with a `root` rule)."""

    structured_outputs: StructuredOutputsParams | None = None
    """Extension (vLLM, the newer form of the guided_* fields): `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`."""

    @field_validator("guided_json")
    @classmethod
    def _schema_is_json(cls, value: Schema | None) -> Schema | None:
        return _parsed_schema(value)

    def grammar_spec(self) -> tuple[GrammarSpec, str] | None:
        """What the output must match and the field that asked for it; None: free text. A 400 if several fields do."""
        specs: list[tuple[GrammarSpec, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs.append((GrammarSpec("json_object"), "response_format"))
        elif rf is not None and rf.json_schema is not None:
            specs.append((GrammarSpec("json_schema", json.dumps(rf.json_schema.schema_)), "response_format"))
        if self.guided_json is not None:
            specs.append((GrammarSpec("json_schema", _schema_text(self.guided_json)), "guided_json"))
        if self.guided_regex is not None:
            specs.append((GrammarSpec("regex", self.guided_regex), "guided_regex"))
        if self.guided_choice is not None:
            specs.append((GrammarSpec("choice", json.dumps(self.guided_choice)), "guided_choice"))
        if self.guided_grammar is not None:
            specs.append((GrammarSpec("grammar", self.guided_grammar), "guided_grammar"))
        if (so := self.structured_outputs) is not None:
            specs.append((_structured_outputs_spec(so), "structured_outputs"))
        if len(specs) > 1:
            raise invalid_param(specs[1][1], f"{specs[0][1]} and {specs[1][1]} both constrain the output; give one")
        return specs[0] if specs else None


def _parsed_schema(value: Schema | None) -> Schema | None:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the schema is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict | bool):
            raise ValueError("a JSON schema is an object")
    return value


def _schema_text(schema: Schema) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _structured_outputs_spec(so: StructuredOutputsParams) -> GrammarSpec:
    if so.json_ is not None:
        return GrammarSpec("json_schema", _schema_text(_parsed_schema(so.json_) or {}))
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    if so.choice is not None:
        return GrammarSpec("choice", json.dumps(so.choice))
    if so.grammar is not None:
        return GrammarSpec("grammar", so.grammar)
    return GrammarSpec("json_object")
