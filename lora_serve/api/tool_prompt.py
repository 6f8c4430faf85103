"""How tools, and the tool calls and results of the history, reach the chat template.

A model whose own chat template renders tools (its source mentions `tools`) gets them as the template
expects: `tools=[{"type": "function", "function": {...}}]`, assistant messages with `tool_calls`
(arguments as objects), `tool` messages with `tool_call_id`. Otherwise (SmolLM2's template, for one)
the built-in rendering, in the Hermes / Qwen convention the `auto` parser reads (tool_calls.py):
- a system preamble lists the functions' JSON schemas between <tools></tools> and says how to call
  one; it goes after the first system message's text, or is that message when there is none;
- an assistant message's calls become its text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- a tool message's text is wrapped in `<tool_response></tool_response>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lora_serve.api.tools import FunctionDefinition, ToolCall

TOOL_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's own chat template shows tools to the model."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tool_specs(functions: Sequence[FunctionDefinition]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]


def call_arguments(call: ToolCall) -> Any:
    """A call's arguments as an object, as chat templates expect them (its text when not JSON)."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def call_text(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def builtin_rendering(messages: list[dict[str, Any]], functions: Sequence[FunctionDefinition]) -> list[dict[str, Any]]:
    """messages (as for_template gives them, tool_calls included) rendered as plain text turns (module docstring)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m.pop("tool_calls")]
            m["content"] = "\n".join([m["content"], *calls] if m["content"] else calls)
        if m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if functions:
        preamble = TOOL_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tool_specs(functions)))
        if out and out[0]["role"] in ("system", "developer"):
            out[0]["content"] = f"{out[0]['content']}\n\n{preamble}" if out[0]["content"] else preamble
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out
