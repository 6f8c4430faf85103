"""Bad requests as a table: each must give the OpenAI error shape with the right status, type, param, code."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import TINY_MAX_MODEL_LEN
from tests.api.live_server import LiveServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CHAT_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
LONG_TEXT = "word " * (2 * TINY_MAX_MODEL_LEN)
BAD = "invalid_request_error"
EMPTY_PARTS = [{"type": "text", "text": ""}] * 1025  # twice: one past the 2048 parts of all messages together

# (id, route, changes to the valid body (None deletes the key), status, error.type, error.param, error.code)
CASES = [
    ("negative-temperature", CHAT, {"temperature": -0.5}, 400, BAD, "temperature", None),
    ("nan-temperature", CHAT, {"temperature": float("nan")}, 400, BAD, "temperature", None),
    ("top-p-zero", CHAT, {"top_p": 0}, 400, BAD, "top_p", None),
    ("top-p-above-one", COMPLETIONS, {"top_p": 1.5}, 400, BAD, "top_p", None),
    ("max-tokens-zero", CHAT, {"max_tokens": 0}, 400, BAD, "max_tokens", None),
    ("max-tokens-negative", COMPLETIONS, {"max_tokens": -3}, 400, BAD, "max_tokens", None),
    ("max-completion-tokens-zero", CHAT, {"max_completion_tokens": 0}, 400, BAD, "max_completion_tokens", None),
    ("empty-messages", CHAT, {"messages": []}, 400, BAD, "messages", None),
    # Counted on the raw JSON, before pydantic builds a model for each (seconds for 4 MiB of them).
    ("messages-over-2048", CHAT, {"messages": [{"role": "user"}] * 2049}, 400, BAD, "messages", None),
    ("content-parts-over-2048", CHAT, {"messages": [{"role": "user", "content": EMPTY_PARTS}] * 2}, 400, BAD, "messages", None),
    ("seed-past-int64", COMPLETIONS, {"seed": 2**63}, 400, BAD, "seed", None),
    ("missing-messages", CHAT, {"messages": None}, 400, BAD, "messages", None),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, BAD, "messages[0].role", None),
    (
        "image-part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        BAD,
        "messages[0].content",
        None,
    ),
    ("stream-options-without-stream", CHAT, {"stream_options": {"include_usage": True}}, 400, BAD, "stream_options", None),
    ("n-zero", CHAT, {"n": 0}, 400, BAD, "n", None),
    ("n-above-max_n", COMPLETIONS, {"n": 17}, 400, BAD, "n", "limit_exceeded"),
    ("best_of-below-n", COMPLETIONS, {"n": 2, "best_of": 1}, 400, BAD, "best_of", None),
    ("best_of-above-n", COMPLETIONS, {"best_of": 3}, 400, BAD, "best_of", None),
    ("presence-penalty-above-2", CHAT, {"presence_penalty": 2.5}, 400, BAD, "presence_penalty", None),
    ("frequency-penalty-below-minus-2", COMPLETIONS, {"frequency_penalty": -2.01}, 400, BAD, "frequency_penalty", None),
    ("nan-frequency-penalty", CHAT, {"frequency_penalty": float("nan")}, 400, BAD, "frequency_penalty", None),
    ("repetition-penalty-zero", CHAT, {"repetition_penalty": 0}, 400, BAD, "repetition_penalty", None),
    ("repetition-penalty-inf", COMPLETIONS, {"repetition_penalty": float("inf")}, 400, BAD, "repetition_penalty", None),
    ("min-p-above-one", CHAT, {"min_p": 1.5}, 400, BAD, "min_p", None),
    ("min-tokens-negative", COMPLETIONS, {"min_tokens": -1}, 400, BAD, "min_tokens", None),
    ("min-tokens-over-max-tokens", CHAT, {"min_tokens": 3}, 400, BAD, "min_tokens", None),
    ("min-tokens-over-context", COMPLETIONS, {"min_tokens": TINY_MAX_MODEL_LEN, "max_tokens": None}, 400, BAD, "min_tokens", None),
    ("logit-bias-not-a-token-id", CHAT, {"logit_bias": {"hello": 1}}, 400, BAD, "logit_bias", None),
    ("logit-bias-negative-id", CHAT, {"logit_bias": {"-1": 1}}, 400, BAD, "logit_bias", None),
    ("logit-bias-leading-zero", COMPLETIONS, {"logit_bias": {"07": 1}}, 400, BAD, "logit_bias", None),
    ("logit-bias-out-of-vocab", COMPLETIONS, {"logit_bias": {"49152": 1}}, 400, BAD, "logit_bias", None),
    ("logit-bias-above-100", CHAT, {"logit_bias": {"5": 100.5}}, 400, BAD, "logit_bias", None),
    ("logit-bias-nan", CHAT, {"logit_bias": {"5": float("nan")}}, 400, BAD, "logit_bias", None),
    ("top-logprobs-too-many", CHAT, {"logprobs": True, "top_logprobs": 21}, 400, BAD, "top_logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, {"top_logprobs": 2}, 400, BAD, "top_logprobs", None),
    ("completion-logprobs-too-many", COMPLETIONS, {"logprobs": 6}, 400, BAD, "logprobs", None),
    ("mixed-prompt-list", COMPLETIONS, {"prompt": ["a", [1, 2]]}, 400, BAD, "prompt", None),
    ("texts-and-token-ids", COMPLETIONS, {"prompt": ["a", 1]}, 400, BAD, "prompt", None),
    ("empty-prompt-in-a-list", COMPLETIONS, {"prompt": [[1, 2], []]}, 400, BAD, "prompt", None),
    ("empty-token-prompt", COMPLETIONS, {"prompt": []}, 400, BAD, "prompt", None),
    ("token-id-out-of-vocab", COMPLETIONS, {"prompt": [10**9]}, 400, BAD, "prompt", None),
    ("max-tokens-0-without-echo", COMPLETIONS, {"max_tokens": 0}, 400, BAD, "max_tokens", None),
    ("prompt-logprobs-streamed", COMPLETIONS, {"prompt_logprobs": 1, "stream": True}, 400, BAD, "prompt_logprobs", None),
    ("prompt-logprobs-above-20", CHAT, {"prompt_logprobs": 21}, 400, BAD, "prompt_logprobs", None),
    ("prompt-logprobs-negative", COMPLETIONS, {"prompt_logprobs": -1}, 400, BAD, "prompt_logprobs", None),
    ("chat-max-tokens-over-context", CHAT, {"max_tokens": TINY_MAX_MODEL_LEN}, 400, BAD, "max_tokens", "context_length_exceeded"),
    (
        "completion-max-tokens-over-context",
        COMPLETIONS,
        {"max_tokens": TINY_MAX_MODEL_LEN},
        400,
        BAD,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "chat-prompt-over-context",
        CHAT,
        {"messages": [{"role": "user", "content": LONG_TEXT}], "max_tokens": None},
        400,
        BAD,
        "messages",
        "context_length_exceeded",
    ),
    (
        "completion-prompt-over-context",
        COMPLETIONS,
        {"prompt": LONG_TEXT, "max_tokens": None},
        400,
        BAD,
        "prompt",
        "context_length_exceeded",
    ),
    ("unknown-model", CHAT, {"model": "no-such-model"}, 404, BAD, "model", "model_not_found"),
    ("unknown-model-completions", COMPLETIONS, {"model": "gpt-4"}, 404, BAD, "model", "model_not_found"),
]


@pytest.mark.parametrize(("route", "changes", "status", "type_", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server: LiveServer, route: str, changes: dict, status: int, type_: str, param: str, code) -> None:
    body = dict(CHAT_BODY if route == CHAT else COMPLETION_BODY)
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    # json.dumps writes NaN as the bare token NaN, as a careless client would; httpx's json= refuses it.
    resp = httpx.post(server.base_url + route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (type_, param, code)
    assert error["message"]


def test_malformed_json_is_400(server: LiveServer) -> None:
    resp = httpx.post(server.base_url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == BAD


def test_openai_client_raises_typed_errors(server: LiveServer) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=server.model, messages=[], max_tokens=2)
    assert info.value.param == "messages"
