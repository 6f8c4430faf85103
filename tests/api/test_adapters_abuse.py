"""Hostile and broken uploads: each is refused with the right status and param, and harms nothing.

After every refusal the server still answers, the stored adapter is byte-for-byte the
same and answers as before, and nothing but stored adapters is left in adapter_dir.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import (
    ADMIN,
    BAD_NAMES,
    TINY_ADAPTERS,
    adapter_files,
    admin_headers,
    make_tiny_adapters,
    tiny_engine_with,
    upload,
    upload_form,
)
from tests.api.live_server import LiveServer, live_server

MAX_ADAPTER_BYTES = 32 * 1024  # r4-attn on the tiny model is about 14 KiB
STORED = "stored"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
MESSAGES = [{"role": "user", "content": "hi"}]

Files = dict[str, bytes]


@pytest.fixture(scope="module")
def good_files(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    configs = {"r4-attn": TINY_ADAPTERS["r4-attn"]}
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), configs)
    return adapter_files(paths["r4-attn"])


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, adapter_dir: Path, good_files: Files) -> Iterator[LiveServer]:
    with tiny_engine_with(tiny_llama_dir, adapter_dir, max_adapter_bytes=MAX_ADAPTER_BYTES) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)) as live:
            assert upload(live.base_url, STORED, good_files).status_code == 201
            yield live


@pytest.fixture(scope="module")
def stored_state(server: LiveServer) -> tuple[str, str]:
    """(sha256, greedy answer) of the stored adapter before any abuse."""
    return _stored_state(server)


def _stored_state(server: LiveServer) -> tuple[str, str]:
    info = httpx.get(f"{server.base_url}/v1/adapters/{STORED}", headers=admin_headers()).json()
    resp = server.client().chat.completions.create(model=STORED, messages=MESSAGES, max_tokens=4, temperature=0)
    return info["sha256"], resp.choices[0].message.content


def _config(good: Files, **changes) -> Files:
    config = json.loads(good["adapter_config"])
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return {**good, "adapter_config": json.dumps(config).encode()}


def _tensors(good: Files, edit: Callable[[dict[str, torch.Tensor]], None]) -> Files:
    tensors = load(good["adapter_model"])
    edit(tensors)
    return {**good, "adapter_model": save(tensors)}


def _set(name: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(name, value)


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q_A][0, 0] = float("nan")


def _header_only(header: bytes) -> bytes:
    """A safetensors file of just [u64 length][header]."""
    return len(header).to_bytes(8, "little") + header


NESTED = b"[" * 5_000 + b"]" * 5_000  # past Python's recursion limit, well under the upload limit
NESTED_CONFIG = b'{"r": ' + NESTED + b"}"
NESTED_HEADER = _header_only(b'{"__metadata__": ' + NESTED + b"}")
EMPTY_TENSOR = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
# 100 tensors: more than the 28 an adapter for the tiny base can hold (2 halves x 7 projections x 2 layers)
HEADER_100 = _header_only(json.dumps({f"t{i}": EMPTY_TENSOR for i in range(100)}).encode())


# id -> (name, files from the good ones, upload file names, status, error param)
CASES: dict[str, tuple] = {
    **{f"name-{case}": (name, lambda g: g, None, 400, "name") for case, name in BAD_NAMES.items()},
    "name-is-base-id": ("tiny", lambda g: g, None, 400, "name"),
    "name-duplicate": (STORED, lambda g: g, None, 409, "name"),
    "missing-name": (None, lambda g: g, None, 400, "name"),
    "missing-config": ("x", lambda g: {"adapter_model": g["adapter_model"]}, None, 400, "adapter_config"),
    "missing-weights": ("x", lambda g: {"adapter_config": g["adapter_config"]}, None, 400, "adapter_model"),
    "files-over-limit": ("x", lambda g: {**g, "adapter_model": b"\0" * (MAX_ADAPTER_BYTES + 1)}, None, 413, None),
    "body-over-limit": ("x", lambda g: {**g, "adapter_model": b"\0" * (4 * MAX_ADAPTER_BYTES)}, None, 413, None),
    "pickle-filename": ("x", lambda g: g, {"adapter_model": "adapter_model.bin"}, 415, "adapter_model"),
    "pickle-content": ("x", lambda g: {**g, "adapter_model": pickle.dumps({"w": [1.0]})}, None, 415, "adapter_model"),
    "malformed-header": ("x", lambda g: {**g, "adapter_model": b"\xff" * 8 + b"{junk"}, None, 400, "adapter_model"),
    "config-not-json": ("x", lambda g: {**g, "adapter_config": b"{not json"}, None, 400, "adapter_config"),
    "config-no-r": ("x", lambda g: _config(g, r=None), None, 400, "r"),
    "config-no-alpha": ("x", lambda g: _config(g, lora_alpha=None), None, 400, "lora_alpha"),
    "config-no-targets": ("x", lambda g: _config(g, target_modules=None), None, 400, "target_modules"),
    "rank-zero": ("x", lambda g: _config(g, r=0), None, 400, "r"),
    "rank-over-max": ("x", lambda g: _config(g, r=32), None, 400, "r"),
    "unknown-target": ("x", lambda g: _config(g, target_modules=["q_proj", "nope_proj"]), None, 400, "target_modules"),
    "A-wrong-shape": ("x", lambda g: _tensors(g, _set(Q_A, torch.zeros(4, 32))), None, 400, Q_A),
    "B-wrong-shape": ("x", lambda g: _tensors(g, _set(Q_B, torch.zeros(64, 3))), None, 400, Q_B),
    "B-missing": ("x", lambda g: _tensors(g, lambda t: t.pop(Q_B)), None, 400, Q_B),
    "nan": ("x", lambda g: _tensors(g, _nan), None, 400, Q_A),
    "int-dtype": ("x", lambda g: _tensors(g, _set(Q_A, torch.ones(4, 64, dtype=torch.int32))), None, 400, Q_A),
    "config-nested-5k": ("x", lambda g: {**g, "adapter_config": NESTED_CONFIG}, None, 400, "adapter_config"),
    "rank-pattern-1000": ("x", lambda g: _config(g, rank_pattern=dict.fromkeys(map(str, range(1000)), 4)), None, 400, "rank_pattern"),
    "header-100-entries": ("x", lambda g: {**g, "adapter_model": HEADER_100}, None, 400, "adapter_model"),
    "header-nested-5k": ("x", lambda g: {**g, "adapter_model": NESTED_HEADER}, None, 400, "adapter_model"),
}


def _check_unharmed(server: LiveServer, adapter_dir: Path, stored_state: tuple[str, str]) -> None:
    assert _stored_state(server) == stored_state
    assert sorted(p.name for p in adapter_dir.iterdir()) == [STORED]
    assert [m.id for m in server.client().models.list().data] == ["tiny", STORED]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused(server: LiveServer, adapter_dir: Path, good_files: Files, stored_state: tuple[str, str], case: str) -> None:
    name, make_files, filenames, status, param = CASES[case]
    resp = upload(server.base_url, name, make_files(good_files), filenames=filenames)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    _check_unharmed(server, adapter_dir, stored_state)


def test_chunked_body_over_the_limit_is_cut_off(server: LiveServer, adapter_dir: Path, stored_state: tuple[str, str]) -> None:
    def body() -> Iterator[bytes]:  # a generator: no Content-Length, chunked transfer encoding
        yield b'--b\r\nContent-Disposition: form-data; name="adapter_model"; filename="m.safetensors"\r\n\r\n'
        for _ in range(8):
            yield b"\0" * 16 * 1024

    headers = {**admin_headers(), "Content-Type": "multipart/form-data; boundary=b"}
    resp = httpx.post(f"{server.base_url}/v1/adapters", content=body(), headers=headers)
    assert resp.status_code == 413
    _check_unharmed(server, adapter_dir, stored_state)


def test_safetensors_whose_first_byte_is_pickles_is_accepted(server: LiveServer, good_files: Files) -> None:
    """A header of 0x80 bytes mod 256 starts the file with b"\\x80", pickle's first byte: still safetensors."""
    tensors = load(good_files["adapter_model"])
    for pad in range(256):
        data = save(tensors, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    resp = upload(server.base_url, "first-byte-0x80", {**good_files, "adapter_model": data})
    assert resp.status_code == 201, resp.text
    assert httpx.delete(f"{server.base_url}/v1/adapters/first-byte-0x80", headers=admin_headers()).status_code == 200


def test_not_multipart_is_415(server: LiveServer) -> None:
    resp = httpx.post(f"{server.base_url}/v1/adapters", json={"name": "x"}, headers=admin_headers())
    assert resp.status_code == 415


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("GET", "/v1/adapters/unknown", None, "name"),
        ("DELETE", "/v1/adapters/unknown", None, "name"),
        ("POST", "/v1/chat/completions", {"model": "unknown", "messages": MESSAGES}, "model"),
        ("POST", "/v1/completions", {"model": "unknown", "prompt": "hi"}, "model"),
    ],
)
def test_unknown_adapter_is_404(server: LiveServer, method: str, path: str, body: dict | None, param: str) -> None:
    resp = httpx.request(method, server.base_url + path, json=body, headers=admin_headers())
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_bad_uploads_under_load_harm_nothing(
    server: LiveServer, adapter_dir: Path, good_files: Files, stored_state: tuple[str, str]
) -> None:
    bad = [c for c in CASES.values() if c[0] != STORED]  # every refusal but the duplicate (409 is covered above)

    async def bad_upload(client: httpx.AsyncClient, i: int) -> int:
        name, make_files, filenames, _, _ = bad[i % len(bad)]
        resp = await client.post("/v1/adapters", **upload_form(name, make_files(good_files), filenames))
        return resp.status_code

    async def good_chat(client: httpx.AsyncClient, model: str) -> httpx.Response:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        return await client.post("/v1/chat/completions", json=body)

    async def run() -> tuple[list[int], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=admin_headers(), timeout=120) as client:
            bads = [bad_upload(client, i) for i in range(50)]
            goods = [good_chat(client, STORED if i % 2 else "tiny") for i in range(8)]
            results = await asyncio.gather(*bads, *goods)
        return list(results[:50]), list(results[50:])

    statuses, chats = asyncio.run(run())
    assert all(400 <= s < 500 for s in statuses), statuses
    assert all(r.status_code == 200 for r in chats), [r.text for r in chats if r.status_code != 200]
    stored_answers = {r.json()["choices"][0]["message"]["content"] for r in chats[1::2]}
    assert stored_answers == {stored_state[1]}
    _check_unharmed(server, adapter_dir, stored_state)
