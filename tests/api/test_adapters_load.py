"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: only inside --allowed-lora-dir, admin key."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import (
    ADMIN,
    BAD_NAMES,
    TINY_ADAPTERS,
    admin_headers,
    chat_prompt_ids,
    make_tiny_adapters,
    peft_greedy,
    tiny_engine_with,
    token_texts,
)
from tests.api.live_server import LiveServer, live_server

USER = "sk-user"
MESSAGES = [{"role": "user", "content": "Load me."}]


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(peft_model, allowed dir holding r4-attn, outside dir holding a copy)."""
    root = tmp_path_factory.mktemp("load")
    allowed, outside = root / "allowed", root / "outside"
    peft_model, paths = make_tiny_adapters(tiny_llama_dir, allowed, {"r4-attn": TINY_ADAPTERS["r4-attn"]})
    shutil.copytree(paths["r4-attn"], outside / "r4-attn")
    os.symlink(outside / "r4-attn", allowed / "escape")
    return peft_model, allowed, outside


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, allowed, _ = dirs
    store = tmp_path_factory.mktemp("store")
    with tiny_engine_with(tiny_llama_dir, store, allowed_lora_dir=[allowed]) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", api_key=USER, admin_api_key=ADMIN)) as live:
            yield live


def _post(server: LiveServer, route: str, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/{route}", json=body, headers=admin_headers(key), timeout=60)


def _error(resp: httpx.Response) -> tuple[int, str, str | None]:
    error = resp.json()["error"]
    return resp.status_code, error["type"], error["param"]


@pytest.mark.parametrize(
    ("lora_name", "lora_path", "status", "param"),
    [
        ("x", "{outside}/r4-attn", 403, "lora_path"),
        ("x", "{allowed}/escape", 403, "lora_path"),  # a symlink out of the allowed dir
        ("x", "{allowed}/../outside/r4-attn", 403, "lora_path"),
        ("x", "/etc", 403, "lora_path"),
        ("x", "{allowed}/missing", 404, "lora_path"),
        ("../x", "{allowed}/r4-attn", 400, "lora_name"),
        ("tiny", "{allowed}/r4-attn", 400, "lora_name"),
    ],
)
def test_load_refused(server: LiveServer, dirs, lora_name: str, lora_path: str, status: int, param: str) -> None:
    _, allowed, outside = dirs
    body = {"lora_name": lora_name, "lora_path": lora_path.format(allowed=allowed, outside=outside)}
    resp = _post(server, "load_lora_adapter", body)
    assert _error(resp) == (status, "invalid_request_error", param)
    assert [m.id for m in server.client(api_key=USER).models.list().data] == ["tiny"]


@pytest.mark.parametrize("lora_name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_load_refuses_a_bad_name(server: LiveServer, dirs, lora_name: str) -> None:
    _, allowed, _ = dirs
    resp = _post(server, "load_lora_adapter", {"lora_name": lora_name, "lora_path": str(allowed / "r4-attn")})
    assert _error(resp) == (400, "invalid_request_error", "lora_name")
    assert [m.id for m in server.client(api_key=USER).models.list().data] == ["tiny"]


def test_load_use_unload(server: LiveServer, dirs) -> None:
    peft_model, allowed, _ = dirs
    body = {"lora_name": "loaded", "lora_path": str(allowed / "r4-attn")}
    assert _post(server, "load_lora_adapter", body, key=USER).status_code == 401
    resp = _post(server, "load_lora_adapter", body)
    assert resp.status_code == 200
    assert (resp.json()["name"], resp.json()["origin"]) == ("loaded", "load-api")
    assert _error(_post(server, "load_lora_adapter", body)) == (409, "invalid_request_error", "lora_name")

    client = server.client(api_key=USER)
    prompt = chat_prompt_ids(server.engine.tokenizer, MESSAGES)
    expected = token_texts(server.engine.tokenizer, peft_greedy(peft_model, "r4-attn", prompt, 6))
    resp = client.chat.completions.create(
        model="loaded", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert [t.token for t in resp.choices[0].logprobs.content] == expected

    assert _post(server, "unload_lora_adapter", {"lora_name": "loaded"}, key=USER).status_code == 401
    assert _post(server, "unload_lora_adapter", {"lora_name": "loaded"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="loaded", messages=MESSAGES, max_tokens=2)
    assert (allowed / "r4-attn").is_dir()  # unloading never deletes files it does not own
    again = _post(server, "unload_lora_adapter", {"lora_name": "loaded"})
    assert _error(again) == (404, "invalid_request_error", "lora_name")


def test_load_disabled_without_allowed_dirs(tiny_llama_dir: Path, dirs, tmp_path: Path) -> None:
    _, allowed, _ = dirs
    with tiny_engine_with(tiny_llama_dir, tmp_path) as engine, live_server(engine, ServerConfig()) as live:
        resp = httpx.post(
            f"{live.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(allowed / "r4-attn")}
        )
        assert _error(resp) == (403, "invalid_request_error", "lora_path")
        assert "--allowed-lora-dir" in resp.json()["error"]["message"]
