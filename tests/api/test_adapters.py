"""Upload an adapter, then use it through the openai client: answers match PEFT; it survives a restart."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.lora.lora_model import WEIGHTS_FILE
from tests.api.adapter_helpers import (
    ADMIN,
    GOOD_NAMES,
    adapter_files,
    admin_headers,
    chat_prompt_ids,
    make_tiny_adapters,
    peft_greedy,
    tiny_engine_with,
    token_texts,
    upload,
)
from tests.api.live_server import LiveServer, live_server

USER = "sk-user"
MESSAGES = [{"role": "user", "content": "Tell me about adapters."}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, adapter_dir: Path) -> Iterator[AsyncEngine]:
    with tiny_engine_with(tiny_llama_dir, adapter_dir) as engine:
        yield engine


def _config() -> ServerConfig:
    return ServerConfig(served_model_name="tiny", api_key=USER, admin_api_key=ADMIN)


@pytest.fixture(scope="module")
def server(engine: AsyncEngine, peft) -> Iterator[LiveServer]:
    _, paths = peft
    with live_server(engine, _config()) as live:
        for name in ("r8-all", "r4-attn"):
            assert upload(live.base_url, name, adapter_files(paths[name])).status_code == 201
        yield live


def _greedy_chat(server: LiveServer, model: str) -> list[str]:
    resp = server.client(api_key=USER).chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=NEW_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert resp.model == model
    return [t.token for t in resp.choices[0].logprobs.content]


@pytest.mark.parametrize("name", ["r8-all", "r4-attn"])
def test_uploaded_adapter_answers_like_peft(server: LiveServer, peft, name: str) -> None:
    peft_model, _ = peft
    tokenizer = server.engine.tokenizer
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    expected = token_texts(tokenizer, peft_greedy(peft_model, name, prompt, NEW_TOKENS))
    base = token_texts(tokenizer, peft_greedy(peft_model, None, prompt, NEW_TOKENS))
    assert expected != base  # the adapter really changes the answer
    assert _greedy_chat(server, name) == expected
    assert _greedy_chat(server, "tiny") == base
    assert _greedy_chat(server, f"tiny:{name}") == expected


def test_an_upload_is_checked_on_an_adapter_thread_with_one_torch_thread(server: LiveServer, peft, monkeypatch) -> None:
    """Its overflow check runs spectral norms: on asyncio's default pool they ran on MKL's own threads, beside
    the engine's steps; the adapter threads run them on one thread."""
    _, paths = peft
    assert server.app is not None
    admin = server.app.state.adapter_admin
    seen: list[tuple[str, int]] = []
    store_upload = admin.store_upload

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return store_upload(*args, **kwargs)

    monkeypatch.setattr(admin, "store_upload", recording)
    try:
        assert upload(server.base_url, "threads-check", adapter_files(paths["r4-attn"])).status_code == 201
        assert len(seen) == 1 and seen[0][0].startswith("lora-serve-acquire") and seen[0][1] == 1, seen
    finally:
        httpx.delete(f"{server.base_url}/v1/adapters/threads-check", headers=admin_headers())


@pytest.mark.parametrize("model", ["nope", "other-base:r8-all", "tiny:nope", "r8-all:tiny"])
def test_unknown_model_is_404(server: LiveServer, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client(api_key=USER).chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


def test_models_lists_base_and_adapters(server: LiveServer, adapter_dir: Path) -> None:
    cards = {m.id: m for m in server.client(api_key=USER).models.list().data}
    assert list(cards) == ["tiny", "r4-attn", "r8-all"]
    for name in ("r4-attn", "r8-all"):
        assert cards[name].parent == "tiny"
        assert cards[name].root == (adapter_dir / name).resolve().name  # a user sees no server path


def test_describe_adapter(server: LiveServer, peft) -> None:
    peft_model, paths = peft
    resp = httpx.get(f"{server.base_url}/v1/adapters/r8-all", headers=admin_headers())
    assert resp.status_code == 200
    info = resp.json()
    num_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".r8-all." in n)
    base_params = sum(p.numel() for p in server.engine.engine.model.parameters())
    assert info["id"] == info["name"] == "r8-all"
    assert info["object"] == "adapter"
    assert info["origin"] == "upload"
    assert info["ranks"] == [8]
    assert info["alpha"] == 16
    assert info["targets"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert info["num_params"] == num_params
    assert info["num_bytes"] == (paths["r8-all"] / WEIGHTS_FILE).stat().st_size
    assert info["params_ratio"] == pytest.approx(num_params / base_params)
    assert info["sha256"] == hashlib.sha256((paths["r8-all"] / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert info["location"] in ("cpu", "device")
    assert info["requests_served"] >= 1
    assert isinstance(info["created"], int)
    listed = httpx.get(f"{server.base_url}/v1/adapters", headers=admin_headers()).json()
    assert [a["name"] for a in listed["data"]] == ["r4-attn", "r8-all"]


def test_management_needs_the_admin_key(server: LiveServer) -> None:
    for key in (USER, "wrong"):
        resp = httpx.get(f"{server.base_url}/v1/adapters", headers=admin_headers(key))
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key=ADMIN).models.list()  # and the admin key is not a user key


def test_openapi_tags_management_as_admin(server: LiveServer) -> None:
    paths = server.app.openapi()["paths"]  # the server has keys, so it does not serve /openapi.json
    assert paths["/v1/adapters"]["post"]["tags"] == ["admin"]
    assert paths["/v1/load_lora_adapter"]["post"]["tags"] == ["admin"]
    assert "admin" not in paths["/v1/chat/completions"]["post"]["tags"]


def test_adapter_survives_a_restart(server: LiveServer, tiny_llama_dir: Path, adapter_dir: Path) -> None:
    before = _greedy_chat(server, "r8-all")
    sha = httpx.get(f"{server.base_url}/v1/adapters/r8-all", headers=admin_headers()).json()["sha256"]
    (adapter_dir / ".upload-crashed").mkdir()  # what a crash mid-upload leaves
    with tiny_engine_with(tiny_llama_dir, adapter_dir) as engine, live_server(engine, _config()) as again:
        info = httpx.get(f"{again.base_url}/v1/adapters/r8-all", headers=admin_headers()).json()
        assert (info["origin"], info["sha256"]) == ("adapter-dir", sha)
        assert _greedy_chat(again, "r8-all") == before
    assert not (adapter_dir / ".upload-crashed").exists()


def test_every_accepted_name_survives_a_restart(server: LiveServer, peft, tiny_llama_dir: Path, adapter_dir: Path) -> None:
    _, paths = peft
    for name in GOOD_NAMES:
        resp = upload(server.base_url, name, adapter_files(paths["r2-mlp"]))
        assert resp.status_code == 201, resp.text
    # A new store and manager on the same folder: the start-up clean-up, then the scan.
    with tiny_engine_with(tiny_llama_dir, adapter_dir) as engine, live_server(engine, _config()) as again:
        listed = httpx.get(f"{again.base_url}/v1/adapters", headers=admin_headers()).json()["data"]
        assert {a["name"]: a["origin"] for a in listed if a["name"] in GOOD_NAMES} == dict.fromkeys(GOOD_NAMES, "adapter-dir")
    for name in GOOD_NAMES:
        assert httpx.delete(f"{server.base_url}/v1/adapters/{name}", headers=admin_headers()).status_code == 200


def test_delete_while_streaming(server: LiveServer, adapter_dir: Path) -> None:
    stream = server.client(api_key=USER).chat.completions.create(
        model="r4-attn", messages=MESSAGES, max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    resp = httpx.delete(f"{server.base_url}/v1/adapters/r4-attn", headers=admin_headers())
    assert resp.status_code == 200
    assert resp.json() == {"id": "r4-attn", "object": "adapter", "deleted": True}
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert not (adapter_dir / "r4-attn").exists()
    assert not [p for p in adapter_dir.iterdir() if p.name.startswith(".")]
    assert httpx.get(f"{server.base_url}/v1/adapters/r4-attn", headers=admin_headers()).status_code == 404
    with pytest.raises(openai.NotFoundError):
        server.client(api_key=USER).chat.completions.create(model="r4-attn", messages=MESSAGES, max_tokens=2)
    assert "r4-attn" not in {m.id for m in server.client(api_key=USER).models.list().data}
