"""The server's per-request limits (ServerConfig): one table of bad requests, each a 400 or 413 naming its cause."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer, live_server

LIMITS = ServerConfig(
    served_model_name="tiny",
    max_prompt_tokens=32,
    max_tokens_limit=8,
    max_stop_strings=2,
    max_stop_chars=8,
    max_top_logprobs=3,
    max_body_bytes=4096,
)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def limited(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(tiny_engine, LIMITS) as live:
        yield live


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "word " * 40}, "prompt"),
        (COMPLETIONS, {"prompt": list(range(100, 140))}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "word " * 40}]}, "messages"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 9}, "max_tokens"),
        (CHAT, {"messages": HI, "max_tokens": 9}, "max_tokens"),
        (CHAT, {"messages": HI, "max_completion_tokens": 100}, "max_completion_tokens"),
        (COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop"),
        (CHAT, {"messages": HI, "stop": "x" * 9}, "stop"),
        (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 4}, "top_logprobs"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 4}, "logprobs"),
    ],
    ids=[
        "prompt-text", "prompt-ids", "chat-messages", "max_tokens", "chat-max_tokens", "max_completion_tokens",
        "stop-count", "stop-length", "top_logprobs", "completions-logprobs",
    ],
)
def test_over_a_limit_is_400_naming_the_param(limited: LiveServer, route: str, body: dict, param: str) -> None:
    resp = httpx.post(limited.base_url + route, json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "limit_exceeded", "invalid_request_error")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_bytes_is_413(limited: LiveServer, chunked: bool) -> None:
    body = b'{"prompt": "' + b"a" * 5000 + b'"}'
    content = iter([body[:1000], body[1000:]]) if chunked else body
    resp = httpx.post(limited.base_url + COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "body_too_large"


def test_within_limits_is_served_and_max_tokens_defaults_to_the_limit(limited: LiveServer) -> None:
    body = {"prompt": "hi", "ignore_eos": True, "stop": ["zz", "yy"], "logprobs": 3}
    resp = httpx.post(limited.base_url + COMPLETIONS, json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == LIMITS.max_tokens_limit
