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
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
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
FILES = (CONFIG_FILE, WEIGHTS_FILE)
MESSAGES = [{"role": "user", "content": "Load me."}]


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(peft_model, allowed dir holding r4-attn, outside dir holding a copy)."""
    root = tmp_path_factory.mktemp("load")
    allowed, outside = root / "allowed", root / "outside"
    peft_model, paths = make_tiny_adapters(tiny_llama_dir, allowed, {"r4-attn": TINY_ADAPTERS["r4-attn"]})
    shutil.copytree(paths["r4-attn"], outside / "r4-attn")
    os.symlink(outside / "r4-attn", allowed / "escape")
    # Folders inside the allowed dir whose files link out of it, and one whose files link within it
    # (a Hugging Face cache: snapshots/<rev>/<file> -> blobs/<hash>).
    for folder, linked_out in [("linked-both", FILES), ("linked-config", FILES[:1]), ("linked-weights", FILES[1:])]:
        (allowed / folder).mkdir()
        for file in FILES:
            source = (outside if file in linked_out else allowed) / "r4-attn" / file
            if file in linked_out:
                os.symlink(source, allowed / folder / file)
            else:
                shutil.copy(source, allowed / folder / file)
    (allowed / "blobs").mkdir()
    (allowed / "hf-style").mkdir()
    for file in FILES:
        shutil.copy(paths["r4-attn"] / file, allowed / "blobs" / file)
        os.symlink(allowed / "blobs" / file, allowed / "hf-style" / file)
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
        ("x", "{allowed}/r4-attn\x00", 400, "lora_path"),
        ("x", "{allowed}/r4\x00/../r4-attn", 400, "lora_path"),
        ("x", "{allowed}/linked-both", 403, "lora_path"),  # its files are symlinks out of the allowed dir
        ("x", "{allowed}/linked-config", 403, "lora_path"),
        ("x", "{allowed}/linked-weights", 403, "lora_path"),
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
        resp = httpx.post(f"{live.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(allowed / "r4-attn")})
        assert _error(resp) == (403, "invalid_request_error", "lora_path")
        assert "--allowed-lora-dir" in resp.json()["error"]["message"]


def test_files_linked_within_the_allowed_dir_load(server: LiveServer, dirs) -> None:
    _, allowed, _ = dirs
    resp = _post(server, "load_lora_adapter", {"lora_name": "hf-style", "lora_path": str(allowed / "hf-style")})
    assert resp.status_code == 200, resp.text
    reply = server.client(api_key=USER).chat.completions.create(model="hf-style", messages=MESSAGES, max_tokens=2)
    assert reply.model == "hf-style"
    assert _post(server, "unload_lora_adapter", {"lora_name": "hf-style"}).status_code == 200


def test_a_file_linked_out_after_loading_is_refused_when_read_again(tiny_llama_dir: Path, dirs, tmp_path: Path) -> None:
    """Files are checked on every read: here the weights, evicted from CPU, are re-read for a request."""
    _, allowed, outside = dirs
    mine = tmp_path / "allowed"
    for name in ("swapped", "other"):
        shutil.copytree(allowed / "r4-attn", mine / name)
    config = ServerConfig(served_model_name="tiny", api_key=USER, admin_api_key=ADMIN)
    lora = {"allowed_lora_dir": [mine], "max_loras": 1, "max_cpu_loras": 1}
    with tiny_engine_with(tiny_llama_dir, tmp_path / "store", **lora) as engine, live_server(engine, config) as live:
        for name in ("swapped", "other"):
            body = {"lora_name": name, "lora_path": str(mine / name)}
            assert _post(live, "load_lora_adapter", body).status_code == 200
        folder = mine / "swapped"
        assert engine.adapters.location("swapped") == "disk"  # evicted: the next request reads it again
        (folder / WEIGHTS_FILE).unlink()
        os.symlink(outside / "r4-attn" / WEIGHTS_FILE, folder / WEIGHTS_FILE)
        resp = httpx.post(
            f"{live.base_url}/v1/completions",
            json={"model": "swapped", "prompt": "hi", "max_tokens": 2},
            headers=admin_headers(USER),
            timeout=30,
        )
    assert _error(resp) == (403, "invalid_request_error", "lora_path")


def test_unloading_an_adapter_dir_adapter_lasts_until_it_is_next_named(server: LiveServer, dirs) -> None:
    """--adapter-dir is shared by replicas, so its folders are served whenever named; unload frees this
    server's copy (and unlists it), DELETE removes the folder for good."""
    _, allowed, _ = dirs
    shutil.copytree(allowed / "r4-attn", server.engine.adapters.adapter_dir / "in-dir")
    client = server.client(api_key=USER)
    assert client.chat.completions.create(model="in-dir", messages=MESSAGES, max_tokens=2).model == "in-dir"
    assert _post(server, "unload_lora_adapter", {"lora_name": "in-dir"}).status_code == 200
    assert "in-dir" not in [m.id for m in client.models.list().data]
    assert client.chat.completions.create(model="in-dir", messages=MESSAGES, max_tokens=2).model == "in-dir"
    assert "in-dir" in [m.id for m in client.models.list().data]
    assert httpx.delete(f"{server.base_url}/v1/adapters/in-dir", headers=admin_headers()).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="in-dir", messages=MESSAGES, max_tokens=2)
    assert not (server.engine.adapters.adapter_dir / "in-dir").exists()
