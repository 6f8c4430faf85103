"""Nothing is silently ignored: each OpenAI field is honoured, a documented no-op, or a 400 naming it
(lora_serve/api/field_policy.py); any other field is OpenAI's "Unrecognized request argument supplied"."""

from __future__ import annotations

import httpx
import pytest

from tests.api.live_server import LiveServer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = {
    CHAT: {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0},
    COMPLETIONS: {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0},
}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ASSISTANT = {"role": "assistant", "content": "hello"}

# What a self-hosted server has nothing to do with: accepted, the output unchanged.
NO_OPS = {
    CHAT: {
        "user": "u-1",
        "safety_identifier": "s-1",
        "metadata": {"k": "v"},
        "store": True,
        "service_tier": "auto",
        "prompt_cache_key": "c",
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"mode": "implicit"},
        "prediction": {"type": "content", "content": "hello"},
    },
    COMPLETIONS: {"user": "u-1"},
}
# The default values of the refused fields, and of the honoured ones that constrain the output or add tools,
# as clients may send them explicitly.
DEFAULTS = {
    CHAT: {
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": False,
        "functions": [],
        "function_call": "none",
        "modalities": ["text"],
    },
    COMPLETIONS: {"best_of": 1, "echo": False, "suffix": ""},
}
REFUSED = [
    (CHAT, {"functions": [TOOL["function"]]}, "functions"),
    (CHAT, {"function_call": "auto"}, "function_call"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
    (CHAT, {"verbosity": "low"}, "verbosity"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    (CHAT, {"messages": [*MESSAGES, {**ASSISTANT, "function_call": {"name": "f", "arguments": "{}"}}]}, "messages[1].function_call"),
    (CHAT, {"messages": [*MESSAGES, {**ASSISTANT, "refusal": "no"}]}, "messages[1].refusal"),
    (COMPLETIONS, {"suffix": "end"}, "suffix"),
]
UNRECOGNIZED = [
    (CHAT, {"foo": 1}, "foo"),
    (CHAT, {"echo": True}, "echo"),  # a completions field (and a vLLM chat extension not served)
    (CHAT, {"skip_special_tokens": False}, "skip_special_tokens"),
    (CHAT, {"chat_template_kwargs": {}}, "chat_template_kwargs"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages[0].weight"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True, "per_chunk": True}}, "stream_options.per_chunk"),
    (COMPLETIONS, {"messages": MESSAGES}, "messages"),
    (COMPLETIONS, {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    (COMPLETIONS, {"foo": None}, "foo"),
]


def _post(server: LiveServer, route: str, changes: dict) -> httpx.Response:
    return httpx.post(server.base_url + route, json={**BODY[route], **changes}, timeout=30)


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_no_ops_and_defaults_are_accepted_and_change_nothing(server: LiveServer, route: str) -> None:
    plain = _post(server, route, {})
    given = _post(server, route, {**NO_OPS[route], **DEFAULTS[route]})
    assert given.status_code == 200, given.text
    assert given.json()["choices"] == plain.json()["choices"]


@pytest.mark.parametrize(("route", "changes", "param"), REFUSED, ids=[p for _, _, p in REFUSED])
def test_refused_unless_the_default(server: LiveServer, route: str, changes: dict, param: str) -> None:
    resp = _post(server, route, changes)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["param"], resp.json()["error"]["type"]) == (param, "invalid_request_error")


@pytest.mark.parametrize(("route", "changes", "param"), UNRECOGNIZED, ids=[p for _, _, p in UNRECOGNIZED])
def test_unrecognized_fields_are_400_in_openais_words(server: LiveServer, route: str, changes: dict, param: str) -> None:
    resp = _post(server, route, changes)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["message"], error["param"]) == (f"Unrecognized request argument supplied: {param}", param)


def test_an_unknown_field_of_a_content_part_is_named(server: LiveServer) -> None:
    """content is a string or a list of parts: the error names the union, and the field in its message."""
    resp = _post(server, CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]})
    assert (resp.status_code, resp.json()["error"]["param"]) == (400, "messages[0].content")
    assert "Unrecognized request argument supplied: messages[0].content[0].x" in resp.json()["error"]["message"]


def test_a_reply_sent_back_as_history_is_accepted(server: LiveServer) -> None:
    """Clients append the assistant message they got back, with its empty fields (refusal, tool_calls, ...)."""
    client = server.client()
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    for reply in (first.choices[0].message, first.choices[0].message.model_dump()):
        messages = [*MESSAGES, reply, {"role": "user", "content": "and then?"}]
        assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices
