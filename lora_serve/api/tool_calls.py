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
it comes back as text, with finish_reason "length".

Streamed (ReplyStream): a forced reply is held until the generation ends; an auto reply streams its text
as content until a `<tool_call>` may begin (the characters that could start one wait), and holds the rest.
At the end what was held goes out as one delta, its calls whole (reply_delta), which the OpenAI
client and LangChain accumulate as they do OpenAI's.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lora_serve.api.responses import AssistantMessage, ChatDelta
from lora_serve.api.tools import FunctionCall, ToolCall, ToolCallDelta, ToolMode
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

TOOL_CALL_TAG = "<tool_call>"
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


def _partial_tag(text: str) -> int:
    """How many characters at the end of text could begin TOOL_CALL_TAG."""
    return next((k for k in range(min(len(TOOL_CALL_TAG) - 1, len(text)), 0, -1) if text.endswith(TOOL_CALL_TAG[:k])), 0)


class ReplyStream:
    """One streamed reply with tools (module docstring): the engine's deltas in, what to send out."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.text = ""
        self.num_sent = 0  # characters of text sent as content
        self.holding = mode.forced  # from here on, everything waits for the end
        self.held_logprobs: list[TokenLogprob] = []

    def push(self, out: RequestOutput) -> tuple[ChatDelta, str | None, list[TokenLogprob]] | None:
        """(the delta to send, its finish_reason, the logprobs of its tokens); None: nothing to send yet."""
        self.text += out.new_text
        if out.finished:
            return self._finish(out)
        if not self.holding and (tag := self.text.find(TOOL_CALL_TAG, self.num_sent)) >= 0:
            self.holding = True
            return self._send(tag, out.new_logprobs)
        if self.holding:
            self.held_logprobs += out.new_logprobs
            return None
        return self._send(len(self.text) - _partial_tag(self.text), out.new_logprobs)

    def _send(self, end: int, logprobs: list[TokenLogprob]) -> tuple[ChatDelta, str | None, list[TokenLogprob]] | None:
        content, self.num_sent = self.text[self.num_sent : end], end
        return (ChatDelta(content=content), None, logprobs) if content or logprobs else None

    def _finish(self, out: RequestOutput) -> tuple[ChatDelta, str | None, list[TokenLogprob]]:
        rest = self.text[self.num_sent :]
        message, finish_reason = assistant_reply(rest, out.finish_reason, self.mode)
        logprobs = [*self.held_logprobs, *out.new_logprobs]
        return reply_delta(message), finish_reason, logprobs
