"""The OpenAI request fields lora-serve does not act on, and what it does with each: nothing is silently ignored.

The fields it honours are in protocol.py, structured_outputs.py (response_format, vLLM's guided_*)
and tools.py (tools, tool_choice, parallel_tool_calls). Of the others, a field is either
- a no-op, accepted with any value of its type, when a self-hosted server has nothing it could do with
  it: `user`, `safety_identifier`, `metadata`, `store` (there is no platform to store completions on),
  `service_tier` (one tier), `prompt_cache_key`, `prompt_cache_retention`, `prompt_cache_options`
  (caching hints; the output is the same), `prediction` (a latency hint; OpenAI's output is the same
  without it), `stream_options.include_obfuscation`;
- or refused with a 400 naming it, unless it asks for what the server does anyway (null, the empty
  list, `"none"`, `["text"]`): the REFUSED tables below. The deprecated `functions` and
  `function_call` are refused in favour of `tools` and `tool_choice`.
A field in neither list, nor in protocol.py, is refused as OpenAI refuses it: "Unrecognized request
argument supplied: <name>" (errors.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator

Accepts = Callable[[Any], bool]  # of a value other than null


def _never(_: Any) -> bool:
    return False


def _empty(value: Any) -> bool:
    return not value


def _refusal(table: dict[str, tuple[Accepts, str]]) -> Any:
    """A pydantic validator for the fields of `table`: name -> (the values accepted besides null, why others are refused)."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        accepts, reason = table[info.field_name or ""]
        if value is not None and not accepts(value):
            raise ValueError(reason)
        return value

    return field_validator(*table)(classmethod(check))


DEPRECATED_FUNCTIONS = "the deprecated function calling fields are not supported; use tools and tool_choice"
CHAT_REFUSED: dict[str, tuple[Accepts, str]] = {
    "functions": (_empty, f"{DEPRECATED_FUNCTIONS}; functions must be empty"),
    "function_call": (lambda v: v == "none", f'{DEPRECATED_FUNCTIONS}; function_call may only be "none"'),
    "audio": (_never, "audio output is not supported"),
    "modalities": (lambda v: v == ["text"], 'only text output is supported; modalities may only be ["text"]'),
    "reasoning_effort": (_never, "the model does not reason; reasoning_effort is not supported"),
    "verbosity": (_never, "verbosity is not supported"),
    "web_search_options": (_never, "web search is not supported"),
    "moderation": (_never, "moderation is not supported"),
}
MESSAGE_REFUSED: dict[str, tuple[Accepts, str]] = {
    "function_call": (_never, f"{DEPRECATED_FUNCTIONS}; an assistant message may not hold a function_call"),
    "refusal": (_never, "an assistant message's refusal is not supported; give its text as content"),
    "audio": (_never, "audio is not supported"),
    "annotations": (_empty, "an assistant message's annotations must be empty"),
}
COMPLETION_REFUSED: dict[str, tuple[Accepts, str]] = {
    "suffix": (_empty, "suffix is not supported"),
}


class ChatFieldPolicy(BaseModel):
    """Chat completions fields that are no-ops or refused unless they ask for the default (module docstring)."""

    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    _refuse_chat = _refusal(CHAT_REFUSED)


class MessageFieldPolicy(BaseModel):
    """Fields of an assistant message as OpenAI returns it, accepted back only when empty (a replayed reply)."""

    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None

    _refuse_message = _refusal(MESSAGE_REFUSED)


class CompletionFieldPolicy(BaseModel):
    """Completions fields that are no-ops or refused unless they ask for the default (module docstring)."""

    user: str | None = None

    suffix: str | None = None

    _refuse_completion = _refusal(COMPLETION_REFUSED)
