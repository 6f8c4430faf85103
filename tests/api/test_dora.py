"""DoRA adapters through the HTTP API: uploaded or loaded, they answer as PEFT does; bad magnitude
vectors are a 400 in OpenAI's error shape, and nothing is stored or listed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import (
    ADMIN,
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
from tests.lora.conftest import ATTN
from tests.lora.test_dora import set_first
from tests.lora.test_lora_model import edit_tensors

MESSAGES = [{"role": "user", "content": "Tell me about magnitudes."}]
NEW_TOKENS = 8
DORA: dict[str, dict] = {
    "dora-all": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True),
    "dora-attn": dict(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True),
}
MAGNITUDE = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("allowed"), DORA)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = peft
    allowed = paths["dora-all"].parent
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store"), allowed_lora_dir=[allowed]) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)) as live:
            yield live


def greedy_tokens(server: LiveServer, model: str) -> list[str]:
    resp = server.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    return [t.token for t in resp.choices[0].logprobs.content]


def load(server: LiveServer, name: str, path: Path) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)}
    return httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=body, headers=admin_headers(), timeout=60)


def test_uploaded_and_loaded_dora_adapters_answer_like_peft(server: LiveServer, peft) -> None:
    peft_model, paths = peft
    assert upload(server.base_url, "dora-all", adapter_files(paths["dora-all"])).status_code == 201
    assert load(server, "dora-attn", paths["dora-attn"]).status_code == 200
    tokenizer = server.engine.tokenizer
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    base = token_texts(tokenizer, peft_greedy(peft_model, None, prompt, NEW_TOKENS))
    for name in DORA:
        expected = token_texts(tokenizer, peft_greedy(peft_model, name, prompt, NEW_TOKENS))
        assert expected != base  # the adapter really changes the answer
        assert greedy_tokens(server, name) == expected
        info = httpx.get(f"{server.base_url}/v1/adapters/{name}", headers=admin_headers()).json()
        assert info["use_dora"] is True
    assert greedy_tokens(server, "tiny") == base


def test_dora_adapter_is_named_alone_at_weight_one_in_adapters(server: LiveServer, peft) -> None:
    """DoRA's scale depends on its whole update, so a weighted or composed DoRA adapter is not PEFT's:
    400 naming `adapters`; {name: 1.0} is the adapter itself."""
    _, paths = peft
    resp = load(server, "dora-attn", paths["dora-attn"])
    assert resp.status_code == 200 or "already" in resp.text
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    for adapters in ({"dora-attn": 0.5}, {"dora-attn": 1.0, "dora-all": 1.0}):
        if "dora-all" in adapters and upload(server.base_url, "dora-all", adapter_files(paths["dora-all"])).status_code not in (201, 409):
            raise AssertionError("dora-all could not be uploaded")
        resp = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "adapters": adapters}, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "adapters"
        assert "DoRA" in resp.json()["error"]["message"]
    alone = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "adapters": {"dora-attn": 1.0}}, timeout=60)
    assert alone.status_code == 200, alone.text
    assert alone.json()["choices"][0]["message"]["content"] == "".join(greedy_tokens(server, "dora-attn"))


# id -> (edit of a copy of dora-all, param the error names)
BAD = {
    "no magnitude vectors": (edit_tensors(lambda t: [t.pop(k) for k in list(t) if "magnitude" in k]), None),
    "magnitude of the wrong shape": (edit_tensors(lambda t: t.update({MAGNITUDE: torch.ones(3)})), MAGNITUDE),
    "NaN magnitude": (edit_tensors(set_first(MAGNITUDE, float("nan"))), MAGNITUDE),
    "Inf magnitude": (edit_tensors(set_first(MAGNITUDE, float("-inf"))), MAGNITUDE),
    "magnitude past the dtype's range": (edit_tensors(set_first(MAGNITUDE, 1e30)), "adapter_model"),
}


@pytest.mark.parametrize("route", ["upload", "load"])
@pytest.mark.parametrize("edit, param", BAD.values(), ids=BAD.keys())
def test_bad_dora_adapter_is_a_400_and_stores_nothing(server: LiveServer, peft, tmp_path: Path, edit, param, route) -> None:
    _, paths = peft
    folder = shutil.copytree(paths["dora-all"], paths["dora-all"].parent / f"bad-{tmp_path.name}")
    try:
        edit(folder)
        store = server.engine.adapters.adapter_dir
        before_files = sorted(p.name for p in store.iterdir())
        before_models = [m.id for m in server.client().models.list().data]
        resp = upload(server.base_url, "bad", adapter_files(folder)) if route == "upload" else load(server, "bad", folder)
        error = resp.json()["error"]
        assert resp.status_code == 400
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert "magnitude" in error["message"] or "DoRA" in error["message"]
        assert param is None or error["param"] == param
        assert sorted(p.name for p in store.iterdir()) == before_files
        assert [m.id for m in server.client().models.list().data] == before_models
    finally:
        shutil.rmtree(folder)
