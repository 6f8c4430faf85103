"""Replicas sharing one --adapter-dir: an upload to one is served by the other on first use.

Two engines (two "replicas") on the tiny Llama share one adapter_dir; each has its own live
server. Names that would leave the folder, or name a dot-folder, are never resolved.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import ADMIN, adapter_files, make_tiny_adapters, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def peft_paths(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))[1]


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
    assert not b.engine.lora.registry.contains("r8-all")
    assert upload(a.base_url, "r8-all", adapter_files(peft_paths["r8-all"])).status_code == 201
    on_a = _greedy(a, "r8-all")
    assert _greedy(b, "r8-all") == on_a
    assert _greedy(b, "tiny:r8-all") == on_a
    assert b.engine.lora.registry.get("r8-all").origin == "adapter-dir"
    assert on_a != _greedy(a, "tiny")  # the adapter changes the answer, so B really used it


def test_manager_resolves_direct_children_only(replicas, shared_dir: Path, peft_paths, tmp_path: Path) -> None:
    _, b = replicas
    lora = b.engine.lora
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
