"""An upload larger than the adapter memory budget (--lora-memory-gb) is refused whole, over HTTP.

The budget bounds what the server can ever hold of one adapter; an adapter over it could never
serve a request, so its upload is 413 in OpenAI's error shape and leaves nothing behind: no folder
in --adapter-dir, no staging leftovers, no name in the lists. A smaller one uploads and serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import EngineConfig, ServerConfig
from lora_serve.engine.resolve import resolve_config
from lora_serve.lora.lora_model import WEIGHTS_FILE
from lora_serve.model.arch import ModelArch
from lora_serve.model.loader import torch_dtype
from tests.api.adapter_helpers import ADMIN, adapter_files, admin_headers, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server

SMALL, LARGE = "r4-attn", "r8-all"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft_paths: dict[str, Path], store: Path) -> Iterator[LiveServer]:
    # The files hold float32 weights: a file's size is the adapter's CPU bytes in float32 (plus a small header),
    # half that where the CPU tier keeps float16 (with the CPU kernels). The budget lies between the two adapters.
    small, large = ((peft_paths[n] / WEIGHTS_FILE).stat().st_size for n in (SMALL, LARGE))
    assert small < large
    lora_dtype = resolve_config(EngineConfig(), ModelArch.from_dir(tiny_llama_dir)).lora.lora_dtype
    budget_gb = (small + large) / 2 / 2**30 * torch_dtype(lora_dtype).itemsize / 4
    with tiny_engine_with(tiny_llama_dir, store, lora_memory_gb=budget_gb) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)) as live:
            yield live


def test_an_adapter_over_the_budget_is_413_and_leaves_nothing(server: LiveServer, peft_paths: dict[str, Path], store: Path) -> None:
    resp = upload(server.base_url, LARGE, adapter_files(peft_paths[LARGE]))
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "adapter_model" and "lora_memory_gb" in error["message"]
    assert list(store.iterdir()) == []  # nor a folder, nor a staging leftover
    listed = httpx.get(f"{server.base_url}/v1/adapters", headers=admin_headers()).json()["data"]
    assert LARGE not in {a["id"] for a in listed}
    reply = httpx.post(f"{server.base_url}/v1/completions", json={"model": LARGE, "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_an_adapter_within_the_budget_uploads_and_serves(server: LiveServer, peft_paths: dict[str, Path], store: Path) -> None:
    assert upload(server.base_url, SMALL, adapter_files(peft_paths[SMALL])).status_code == 201
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [SMALL]
    reply = httpx.post(f"{server.base_url}/v1/completions", json={"model": SMALL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == SMALL
