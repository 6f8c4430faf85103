"""Structured outputs through the API, on the embedded model and an adapter of it: OpenAI's response_format
and vLLM's guided_* / structured_outputs, whole and streamed; what cannot compile is a 400 naming the field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.api.conftest import EMBEDDED_ADAPTER
from tests.api.live_server import LiveServer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and a favourite colour."}]
MAX_TOKENS = 48


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_for_the_base_and_an_adapter_sent_together(embedded_server: LiveServer) -> None:
    client = embedded_server.client()
    models = [embedded_server.model, EMBEDDED_ADAPTER, embedded_server.model, EMBEDDED_ADAPTER]

    def ask(model: str):
        return client.chat.completions.create(
            model=model, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format=_json_schema(PERSON)
        )

    with ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(ask, models))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert replies[0].choices[0].message.content == replies[2].choices[0].message.content  # greedy, whatever the batch


def test_json_schema_streamed(embedded_server: LiveServer) -> None:
    stream = embedded_server.client().chat.completions.create(
        model=EMBEDDED_ADAPTER,
        messages=ASK,
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=3,
        stream=True,
        response_format=_json_schema(PERSON),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_is_an_object(embedded_server: LiveServer) -> None:
    reply = embedded_server.client().chat.completions.create(
        model=embedded_server.model,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_choice": ["sunny", "rainy", "snowy"]}, lambda text: text in ("sunny", "rainy", "snowy")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
        ({"structured_outputs": {"regex": r"(ab){1,3}c"}}, lambda text: re.fullmatch(r"(ab){1,3}c", text)),
        ({"guided_grammar": 'root ::= "x=" [0-9] [0-9]'}, lambda text: re.fullmatch(r"x=[0-9]{2}", text)),
        ({"guided_json": json.dumps(PERSON)}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
        ({"structured_outputs": {"json": PERSON}}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ],
    ids=[
        "guided_choice",
        "structured_outputs.choice",
        "guided_regex",
        "structured_outputs.regex",
        "guided_grammar",
        "guided_json",
        "structured_outputs.json",
    ],
)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_vllm_guided_fields(embedded_server: LiveServer, route: str, extra: dict, check) -> None:
    client = embedded_server.client()
    if route == "chat":
        reply = client.chat.completions.create(
            model=EMBEDDED_ADAPTER,
            messages=[{"role": "user", "content": "Answer."}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body=extra,
        )
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    else:
        done = client.completions.create(
            model=embedded_server.model, prompt="The answer is", max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        text, finish = done.choices[0].text, done.choices[0].finish_reason
    assert finish == "stop" and check(text), text


BAD = [
    ({"response_format": _json_schema({"type": "nope"})}, "response_format", "Unsupported type"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json", "nowhere"),
    ({"guided_regex": "(ab"}, "guided_regex", "parenthesis"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "EBNF"),
    ({"guided_choice": []}, "guided_choice", "at least 1"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "both constrain"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
]


@pytest.mark.parametrize(("extra", "param", "reason"), BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_what_cannot_constrain_is_a_400_naming_the_field(embedded_server: LiveServer, extra: dict, param: str, reason: str) -> None:
    body = {"model": embedded_server.model, "messages": ASK, "max_tokens": 4, **extra}
    resp = httpx.post(f"{embedded_server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert reason in error["message"], error["message"]
