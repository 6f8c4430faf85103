"""Tool calling through the official openai client on the embedded model: required and named tool_choice give
valid calls (their arguments validate against the function's schema), whole and streamed; the history's calls
and results reach the prompt; `auto` replies are parsed for <tool_call> blocks."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from transformers import AutoTokenizer

from lora_serve.api.tool_calls import ReplyStream, assistant_reply
from lora_serve.api.tools import FunctionDefinition, ToolMode
from lora_serve.engine.outputs import RequestOutput
from tests.api.conftest import EMBEDDED_ADAPTER
from tests.api.live_server import LiveServer

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 16}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
MAX_TOKENS = 60


def _check_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", ["base", EMBEDDED_ADAPTER])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"])
def test_forced_choices_return_valid_calls(embedded_server: LiveServer, model: str, tool_choice) -> None:
    model = embedded_server.model if model == "base" else model
    reply = embedded_server.client().chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, ["get_time"] if isinstance(tool_choice, dict) else SCHEMAS)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"])
def test_streamed_calls_accumulate_in_the_openai_client(embedded_server: LiveServer, tool_choice) -> None:
    with embedded_server.client().chat.completions.stream(
        model=EMBEDDED_ADAPTER,
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,  # else the array of calls may grow to max_tokens with a model this small
        max_tokens=MAX_TOKENS,
        temperature=0.7,
        seed=5,
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, ["get_weather"] if isinstance(tool_choice, dict) else SCHEMAS)


@pytest.mark.parametrize("stream", [False, True])
def test_each_of_n_choices_gets_its_own_calls(embedded_server: LiveServer, stream: bool) -> None:
    """n > 1: one grammar for the request, a matcher (and, streamed, a reply state) per choice."""
    kwargs = dict(model=EMBEDDED_ADAPTER, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=MAX_TOKENS, temperature=0.8, seed=11, n=3)  # fmt: skip
    client = embedded_server.client()
    if not stream:
        choices = client.chat.completions.create(**kwargs).choices
    else:
        with client.chat.completions.stream(**kwargs) as streamed:
            choices = streamed.get_final_completion().choices
    assert sorted(c.index for c in choices) == [0, 1, 2]
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls)


def test_a_conversation_with_calls_and_results_is_rendered(embedded_server: LiveServer, default_model_dir) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    reply = embedded_server.client().chat.completions.create(
        model=embedded_server.model, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    body = {"model": embedded_server.model, "messages": messages}
    tokens = httpx.post(f"{embedded_server.base_url}/tokenize", json=body, timeout=30).json()["tokens"]
    prompt = AutoTokenizer.from_pretrained(default_model_dir).decode(tokens)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        (
            {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}]},
            "messages[1].tool_calls[0].function",
        ),
    ],
)
def test_bad_tool_fields_are_400s_naming_them(embedded_server: LiveServer, changes: dict, param: str) -> None:
    body = {"model": embedded_server.model, "messages": ASK, "max_tokens": 4, **changes}
    resp = httpx.post(f"{embedded_server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


AUTO = ToolMode("auto", tuple(FunctionDefinition.model_validate(t["function"]) for t in TOOLS))


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("It is sunny.", "It is sunny.", []),
        ('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>', None, [("get_time", {"timezone": "CET"})]),
        (
            'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "parameters": {"timezone": "UTC"}}',  # the last one unclosed, at the end
            "Let me check.",
            [("get_weather", {"city": "Oslo"}), ("get_time", {"timezone": "UTC"})],
        ),
        ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ],
)
def test_auto_replies_are_parsed_for_tool_call_blocks(text: str, content: str | None, calls: list) -> None:
    message, finish_reason = assistant_reply(text, "stop", AUTO)
    assert message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()] == calls
    assert finish_reason == ("tool_calls" if calls else "stop")


def test_auto_streams_text_until_a_call_may_begin() -> None:
    pieces = ["Let me ", "check <", "tool", '_call>{"name": "get_time", ', '"arguments": {"timezone": "CET"}}</tool_call>', ""]
    stream = ReplyStream(AUTO)
    sent = []
    for i, piece in enumerate(pieces):
        out = RequestOutput("r", [i], piece, [], 5, i + 1, finish_reason="stop" if i == len(pieces) - 1 else None)
        sent.append(stream.push(out))
    deltas = [s for s in sent if s is not None]
    assert "".join(d.content or "" for d, _, _ in deltas) == "Let me check "  # "<" waits: it could begin a call
    delta, finish_reason, _ = deltas[-1]
    assert finish_reason == "tool_calls" and [c.index for c in delta.tool_calls] == [0]
    assert (delta.tool_calls[0].function.name, json.loads(delta.tool_calls[0].function.arguments)) == ("get_time", {"timezone": "CET"})


def test_auto_without_calls_streams_what_it_would_return_whole(embedded_server: LiveServer) -> None:
    client = embedded_server.client()
    ask = {"model": EMBEDDED_ADAPTER, "messages": ASK, "tools": TOOLS, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert len(chunks) > 3  # streamed as it comes, not held to the end
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.message.tool_calls is None and streamed == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
