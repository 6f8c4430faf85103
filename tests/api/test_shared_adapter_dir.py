"""Replicas sharing one --adapter-dir: an upload to one is served by the other on first use, and
a delete on one is a 404 on the other from its next use (requests running on it finish).

Two engines (two "replicas") on the tiny Llama share one adapter_dir; each has its own live
server. Names that would leave the folder, or name a dot-folder, are never resolved.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import ADMIN, adapter_files, admin_headers, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-adapters")


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir: Path, shared_dir: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    config = ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)
    with (
        tiny_engine_with(tiny_llama_dir, shared_dir) as engine_a,
        tiny_engine_with(tiny_llama_dir, shared_dir) as engine_b,
        live_server(engine_a, config) as a,
        live_server(engine_b, config) as b,
    ):
        yield a, b


def _greedy(server: LiveServer, model: str) -> str:
    resp = server.client().completions.create(
        model=model, prompt="Shared adapters", max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    return resp.choices[0].text


def test_upload_on_one_replica_is_served_by_the_other(replicas, peft_paths) -> None:
    a, b = replicas
    assert not b.engine.adapters.contains("r8-all")
    assert upload(a.base_url, "r8-all", adapter_files(peft_paths["r8-all"])).status_code == 201
    on_a = _greedy(a, "r8-all")
    assert _greedy(b, "r8-all") == on_a
    assert _greedy(b, "tiny:r8-all") == on_a
    assert b.engine.adapters.get("r8-all").origin == "adapter-dir"
    assert on_a != _greedy(a, "tiny")  # the adapter changes the answer, so B really used it


def _delete(server: LiveServer, name: str) -> None:
    resp = httpx.delete(f"{server.base_url}/v1/adapters/{name}", headers=admin_headers(), timeout=30)
    assert resp.status_code == 200, resp.text


def _listed(server: LiveServer) -> tuple[set[str], set[str]]:
    """What /v1/models and /v1/adapters list."""
    models = {m.id for m in server.client().models.list().data}
    adapters = httpx.get(f"{server.base_url}/v1/adapters", headers=admin_headers(), timeout=30).json()["data"]
    return models, {a["name"] for a in adapters}


def _not_found(server: LiveServer, model: str) -> dict:
    with pytest.raises(openai.NotFoundError) as info:
        _greedy(server, model)
    return info.value.body


def test_delete_on_one_replica_is_404_on_the_other_after_running_requests(replicas, peft_paths) -> None:
    a, b = replicas
    assert upload(a.base_url, "r2-mlp", adapter_files(peft_paths["r2-mlp"])).status_code == 201
    running = b.client().completions.create(
        model="r2-mlp",
        prompt="Shared adapters",
        max_tokens=200,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(running)
    assert next(chunks).choices[0].text is not None  # B resolved it from the folder and is generating
    assert "r2-mlp" in _listed(b)[0]
    _delete(a, "r2-mlp")
    assert _not_found(b, "r2-mlp") == _not_found(b, "never-stored") | {"message": "The model `r2-mlp` does not exist."}
    rest = list(chunks)  # the request already running on B ran to its end
    assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 200
    assert all("r2-mlp" not in listed for listed in _listed(b))
    assert not b.engine.adapters.contains("r2-mlp")


def test_an_adapter_stored_again_under_its_name_is_read_again(replicas, peft_paths) -> None:
    a, b = replicas
    assert upload(a.base_url, "swap", adapter_files(peft_paths["r8-all"])).status_code == 201
    before = _greedy(b, "swap")
    _delete(a, "swap")
    assert upload(a.base_url, "swap", adapter_files(peft_paths["r4-attn"])).status_code == 201
    after = _greedy(a, "swap")
    assert after != before
    assert _greedy(b, "swap") == after  # B noticed the new folder (ext4 may even reuse the inode number) and registered it anew


def test_manager_resolves_direct_children_only(replicas, shared_dir: Path, peft_paths, tmp_path: Path) -> None:
    _, b = replicas
    lora = b.engine.adapters
    shutil.copytree(peft_paths["r4-attn"], shared_dir / ".hidden")
    outside = tmp_path / "outside"
    shutil.copytree(peft_paths["r4-attn"], outside)
    (shared_dir / "link-out").symlink_to(outside)
    for name in (".hidden", "..", "../outside", "link-out", "missing", "tiny"):
        assert not lora.resolve_from_adapter_dir(name), name
        assert not lora.registry.contains(name)


@pytest.mark.parametrize("model", [".hidden", "..", "../outside", "nested/../r2-mlp"])
def test_unresolvable_names_are_404(replicas, shared_dir: Path, peft_paths, model: str) -> None:
    _, b = replicas
    if not (shared_dir / ".hidden").exists():
        shutil.copytree(peft_paths["r4-attn"], shared_dir / ".hidden")
    with pytest.raises(openai.NotFoundError):
        _greedy(b, model)
