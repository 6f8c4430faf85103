"""Tool calling: the chat request's `tools`, `tool_choice` and `parallel_tool_calls`, and the calls themselves.

What each tool_choice does (OpenAI's meaning; vLLM's way of forcing calls):
    none       the tools are not shown to the model; the reply is text
    auto       the tools are shown (tool_prompt.py); `<tool_call>` blocks in the reply become calls (tool_calls.py)
    required   the reply is constrained by a JSON schema built from the tools: a JSON array of
               {"name", "arguments"} calls (one call when parallel_tool_calls is false)
    {"type": "function", "function": {"name": N}}
               the reply is constrained to N's `parameters` schema: the arguments of one call to N
so `required` and named choices give valid calls even from a small model. The default is auto with
tools, none without.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from lora_serve.api.errors import invalid_param
from lora_serve.api.protocol_base import RequestBody
from lora_serve.engine.grammar import GrammarSpec

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema (None: no arguments)."""

    strict: bool | None = None
    """Accepted; forced calls always follow the schema strictly."""

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters or NO_PARAMETERS


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as a JSON object's text (OpenAI's shape)."""


class ToolCall(BaseModel):
    """A call in a reply, or in an assistant message of the history (other keys, like a stream's `index`, are ignored)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    """A whole call in one stream delta; `index` is its place among the reply's calls."""

    index: int


ToolChoiceKind = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolMode:
    """What a request's tool fields ask for, resolved once."""

    kind: ToolChoiceKind
    tools: tuple[FunctionDefinition, ...] = ()
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.kind in ("required", "named")

    def grammar_spec(self) -> GrammarSpec | None:
        """The JSON schema a forced reply follows (module docstring); None when the reply is free."""
        if self.kind == "named":
            return GrammarSpec("json_schema", json.dumps(self.tools[0].parameters_schema))
        if self.kind != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters_schema},
                "required": ["name", "arguments"],
            }
            for f in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return GrammarSpec("json_schema", json.dumps(schema))


class ToolFields(RequestBody):
    """The chat request's tool fields (module docstring)."""

    tools: list[Tool] | None = None
    """Functions the model may call (OpenAI)."""

    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """none, auto, required, or {"type": "function", "function": {"name"}} (default: auto with tools, none without)."""

    parallel_tool_calls: bool = True
    """With tool_choice required: false allows only one call in the reply."""

    def tool_mode(self) -> ToolMode:
        """The resolved mode; a 400 naming tool_choice when it asks for a tool that is not given."""
        functions = tuple(t.function for t in self.tools or ())
        choice = self.tool_choice or ("auto" if functions else "none")
        if choice == "none":
            return ToolMode("none")
        if not functions:
            raise invalid_param("tool_choice", f"tool_choice {json.dumps(_dump(choice))} needs tools")
        if isinstance(choice, NamedToolChoice):
            named = [f for f in functions if f.name == choice.function.name]
            if not named:
                raise invalid_param("tool_choice", f"tool_choice names {choice.function.name!r}, which is not among the tools")
            return ToolMode("named", (named[0],), parallel=False)
        return ToolMode(choice, functions, self.parallel_tool_calls)


def _dump(choice: str | NamedToolChoice) -> Any:
    return choice if isinstance(choice, str) else choice.model_dump()
