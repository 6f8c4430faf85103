"""A finished chat generation as the assistant's reply: its text, or the tool calls it holds.

    message, finish_reason = assistant_reply(text, finish_reason, mode)   # mode: tools.ToolMode

- none: the text is the content.
- named: the text is the call's arguments (its schema constrained it): one call.
- required: the text is a JSON array of {"name", "arguments"} (constrained likewise): those calls.
- auto: each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block naming one of the tools
  is a call (an unclosed last block too, when the model stopped inside it); the rest of the text,
  if any, is the content. No valid block: the text is the content.
A reply with calls has `content` null unless text surrounds them, and `finish_reason` "tool_calls"
(when the generation stopped on its own). A forced reply cut short by max_tokens is not valid JSON:
it comes back as text, with finish_reason "length". A streamed reply with tools is held until the
generation ends, then sent as one delta (reply_delta) that the OpenAI client and LangChain accumulate.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lora_serve.api.protocol import AssistantMessage, ChatDelta
from lora_serve.api.tools import FunctionCall, ToolCall, ToolCallDelta, ToolMode

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def new_call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))
    )


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _forced_calls(text: str, mode: ToolMode) -> list[ToolCall]:
    value = _loads(text)
    if mode.kind == "named":
        return [new_call(mode.tools[0].name, value)] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    return [new_call(c["name"], c["arguments"]) for c in value if isinstance(c, dict) and {"name", "arguments"} <= c.keys()]


def _parsed_blocks(text: str, mode: ToolMode) -> tuple[str, list[ToolCall]]:
    """(the text outside the valid blocks, the calls of those blocks)."""
    names = {f.name for f in mode.tools}
    calls: list[ToolCall] = []
    rest: list[str] = []
    end = 0
    for block in TOOL_CALL_BLOCK.finditer(text):
        call = _loads(block.group(1))
        if not (isinstance(call, dict) and call.get("name") in names):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append(new_call(call["name"], arguments if arguments is not None else {}))
        rest.append(text[end : block.start()])
        end = block.end()
    rest.append(text[end:])
    return "".join(rest).strip(), calls


def assistant_reply(text: str, finish_reason: str | None, mode: ToolMode) -> tuple[AssistantMessage, str | None]:
    """The reply message for a finished generation of `text`, and its finish_reason (module docstring)."""
    if mode.kind == "none":
        return AssistantMessage(content=text), finish_reason
    if mode.forced:
        content, calls = None, _forced_calls(text, mode)
    else:
        rest, calls = _parsed_blocks(text, mode)
        content = rest or None
    if not calls:
        return AssistantMessage(content=text), finish_reason
    return AssistantMessage(content=content, tool_calls=calls), "tool_calls" if finish_reason == "stop" else finish_reason


def reply_delta(message: AssistantMessage) -> ChatDelta:
    """A held reply as one stream delta: its content and every call, each whole."""
    calls = [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(message.tool_calls or ())]
    return ChatDelta(content=message.content, tool_calls=calls or None)
