"""The server's per-request limits (ServerConfig) and field bounds: tables of bad requests, each a 400
or 413 naming its cause. Every bad request is also sent naming an adapter: the adapter holds no
reference afterwards, and can be deleted and uploaded again under its name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import (
    ADMIN,
    TINY_ADAPTERS,
    adapter_files,
    admin_headers,
    make_tiny_adapters,
    tiny_engine_with,
    upload,
)
from tests.api.live_server import LiveServer, live_server

LIMITS = ServerConfig(
    served_model_name="tiny",
    admin_api_key=ADMIN,
    max_prompt_tokens=32,
    max_tokens_limit=8,
    max_stop_strings=2,
    max_stop_chars=8,
    max_stop_token_ids=4,
    max_logit_bias=3,
    max_prompt_chars_per_token=32,  # so 32 x 32 = 1024 characters before tokenizing
    max_top_logprobs=3,
    max_body_bytes=4096,
    max_n=3,
    max_prompts=2,
)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
ADAPTER = "r4-attn"
PAST_VOCAB = 10**9


@pytest.fixture(scope="module")
def adapter_src(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("src"), {ADAPTER: TINY_ADAPTERS[ADAPTER]})
    return paths[ADAPTER]


@pytest.fixture(scope="module")
def limited(tiny_llama_dir: Path, adapter_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Serves the base and ADAPTER, uploaded at start into its own adapter_dir."""
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store")) as engine:
        with live_server(engine, LIMITS) as live:
            assert upload(live.base_url, ADAPTER, adapter_files(adapter_src)).status_code == 201
            yield live


def _assert_released_and_reusable(live: LiveServer, adapter_src: Path) -> None:
    """No reference left on ADAPTER (a leaked one keeps a deleted name taken: 409 until restart)."""
    lora = live.engine.adapters
    deadline = time.monotonic() + 5
    while lora.num_refs(ADAPTER) != 0:
        assert time.monotonic() < deadline, f"{lora.num_refs(ADAPTER)} references left on {ADAPTER}"
        time.sleep(0.01)
    resp = httpx.delete(f"{live.base_url}/v1/adapters/{ADAPTER}", headers=admin_headers())
    assert resp.status_code == 200, resp.text
    resp = upload(live.base_url, ADAPTER, adapter_files(adapter_src))
    assert resp.status_code == 201, resp.text
    body = {"model": ADAPTER, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(live.base_url + COMPLETIONS, json=body, timeout=30).status_code == 200


# id -> (route, body, param); each over a ServerConfig limit: 400, code "limit_exceeded"
OVER_A_LIMIT = {
    "prompt-text": (COMPLETIONS, {"prompt": "word " * 40}, "prompt"),
    "prompt-ids": (COMPLETIONS, {"prompt": list(range(100, 140))}, "prompt"),
    "chat-messages": (CHAT, {"messages": [{"role": "user", "content": "word " * 40}]}, "messages"),
    "prompt-chars-before-tokenizing": (COMPLETIONS, {"prompt": "a" * 1025}, "prompt"),
    "chat-chars-before-tokenizing": (CHAT, {"messages": [{"role": "user", "content": "a" * 1025}]}, "messages"),
    "chat-message-count": (CHAT, {"messages": HI * 33}, "messages"),
    "max_tokens": (COMPLETIONS, {"prompt": "hi", "max_tokens": 9}, "max_tokens"),
    "chat-max_tokens": (CHAT, {"messages": HI, "max_tokens": 9}, "max_tokens"),
    "max_completion_tokens": (CHAT, {"messages": HI, "max_completion_tokens": 100}, "max_completion_tokens"),
    "stop-count": (COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop"),
    "stop-length": (CHAT, {"messages": HI, "stop": "x" * 9}, "stop"),
    "stop_token_ids-count": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids"),
    "logit_bias-count": (CHAT, {"messages": HI, "logit_bias": {str(t): 1 for t in range(4)}}, "logit_bias"),
    "top_logprobs": (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 4}, "top_logprobs"),
    "completions-logprobs": (COMPLETIONS, {"prompt": "hi", "logprobs": 4}, "logprobs"),
    "prompt_logprobs": (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 4}, "prompt_logprobs"),
    "n": (CHAT, {"messages": HI, "n": 4}, "n"),
    "completions-n": (COMPLETIONS, {"prompt": "hi", "n": 4}, "n"),
    "prompt-count": (COMPLETIONS, {"prompt": ["a", "b", "c"]}, "prompt"),
    "a-prompt-of-a-list": (COMPLETIONS, {"prompt": ["hi", "word " * 40]}, "prompt"),
}


def _assert_over_a_limit(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "limit_exceeded", "invalid_request_error")


@pytest.mark.parametrize(("route", "body", "param"), OVER_A_LIMIT.values(), ids=OVER_A_LIMIT.keys())
def test_over_a_limit_is_400_naming_the_param(limited: LiveServer, route: str, body: dict, param: str) -> None:
    _assert_over_a_limit(httpx.post(limited.base_url + route, json=body, timeout=30), param)


@pytest.mark.parametrize(("route", "body", "param"), OVER_A_LIMIT.values(), ids=OVER_A_LIMIT.keys())
def test_over_a_limit_on_an_adapter_is_400_and_releases_it(
    limited: LiveServer, adapter_src: Path, route: str, body: dict, param: str
) -> None:
    _assert_over_a_limit(httpx.post(limited.base_url + route, json={**body, "model": ADAPTER}, timeout=30), param)
    _assert_released_and_reusable(limited, adapter_src)


def test_prompt_chars_are_refused_before_tokenizing(limited: LiveServer) -> None:
    resp = httpx.post(limited.base_url + COMPLETIONS, json={"prompt": "a" * 1025}, timeout=30)
    assert resp.json()["error"]["message"] == (
        "the prompt has 1025 characters; the limit is 1024 (32 per token of the prompt's 32-token limit)"
    )


# id -> (route, body, status, param, code); malformed fields and requests that can never run
BAD_FIELDS = {
    "seed-2**64": (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed", None),
    "seed-2**63": (CHAT, {"messages": HI, "seed": 2**63}, 400, "seed", None),
    "seed-below-int64": (COMPLETIONS, {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed", None),
    "seed-streamed": (COMPLETIONS, {"prompt": "hi", "seed": 2**64, "stream": True}, 400, "seed", None),
    "stop_token_ids-string": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": ["x"]}, 400, "stop_token_ids[0]", None),
    "stop_token_ids-negative": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    "stop_token_ids-past-vocab": (CHAT, {"messages": HI, "stop_token_ids": [PAST_VOCAB]}, 400, "stop_token_ids", None),
    "stop_token_ids-2**64": (CHAT, {"messages": HI, "stop_token_ids": [2**64]}, 400, "stop_token_ids", None),
    "prompt-past-context": (COMPLETIONS, {"prompt": [5] * 300}, 400, "prompt", "context_length_exceeded"),
    "prompt-ids-past-vocab": (COMPLETIONS, {"prompt": [5, PAST_VOCAB]}, 400, "prompt", None),
    "prompt-empty": (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    "max_tokens-0": (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    "max_tokens-string": (CHAT, {"messages": HI, "max_tokens": "eight"}, 400, "max_tokens", None),
    "n-0": (CHAT, {"messages": HI, "n": 0}, 400, "n", None),
    "a-prompt-of-a-list-past-context": (COMPLETIONS, {"prompt": [[5], [5] * 300]}, 400, "prompt", "context_length_exceeded"),
    "temperature-negative": (CHAT, {"messages": HI, "temperature": -1}, 400, "temperature", None),
}


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_field_on_an_adapter_is_refused_and_releases_it(
    limited: LiveServer, adapter_src: Path, route: str, body: dict, status: int, param: str, code: str | None
) -> None:
    resp = httpx.post(limited.base_url + route, json={**body, "model": ADAPTER}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    _assert_released_and_reusable(limited, adapter_src)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_bytes_is_413(limited: LiveServer, chunked: bool) -> None:
    body = b'{"prompt": "' + b"a" * 5000 + b'"}'
    content = iter([body[:1000], body[1000:]]) if chunked else body
    resp = httpx.post(limited.base_url + COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "body_too_large"


def test_within_limits_is_served_and_max_tokens_defaults_to_the_limit(limited: LiveServer) -> None:
    body = {"prompt": "hi", "ignore_eos": True, "stop": ["zz", "yy"], "logprobs": 3, "stop_token_ids": [1, 2, 3, 4]}
    resp = httpx.post(limited.base_url + COMPLETIONS, json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == LIMITS.max_tokens_limit
