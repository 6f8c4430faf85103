"""Per-tenant upload quotas (--max-adapters-per-tenant, --max-adapter-bytes-per-tenant): 403
"quota_exceeded" before anything is stored, never passed by concurrent uploads, admins not limited."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.lora.store import OWNER_FILE
from tests.api.adapter_helpers import TINY_ADAPTERS, adapter_files, admin_headers, make_tiny_adapters, tiny_engine_with, upload_form
from tests.api.adapter_helpers import upload as upload_as
from tests.api.live_server import LiveServer, live_server

ACME, GLOBEX, OPS = "sk-acme-0001", "sk-globex-01", "sk-ops-admin"
KEYS = {
    "keys": [
        {"key": ACME, "tenant": "acme"},
        {"key": GLOBEX, "tenant": "globex"},
        {"key": OPS, "tenant": "ops", "role": "admin"},
    ]
}
Files = dict[str, bytes]


@pytest.fixture(scope="module")
def files(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), {"r4-attn": TINY_ADAPTERS["r4-attn"]})
    return adapter_files(paths["r4-attn"])


@contextmanager
def quota_server(tiny_llama_dir: Path, root: Path, **quota: int) -> Iterator[LiveServer]:
    (root / "keys.json").write_text(json.dumps(KEYS))
    config = ServerConfig(served_model_name="tiny", auth_file=root / "keys.json", **quota)
    with tiny_engine_with(tiny_llama_dir, root / "adapters") as engine, live_server(engine, config) as live:
        yield live


def _upload(server: LiveServer, name: str, files: Files, key: str) -> httpx.Response:
    return upload_as(server.base_url, name, files, api_key=key)


def _quota_error(resp: httpx.Response) -> None:
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "quota_exceeded")


def _owned(root: Path, tenant: str) -> list[str]:
    stored = [p for p in (root / "adapters").iterdir() if not p.name.startswith(".")]
    return sorted(p.name for p in stored if (p / OWNER_FILE).is_file() and (p / OWNER_FILE).read_text() == tenant)


def test_adapter_count_quota(tiny_llama_dir: Path, tmp_path: Path, files: Files) -> None:
    with quota_server(tiny_llama_dir, tmp_path, max_adapters_per_tenant=2) as server:
        assert [_upload(server, n, files, ACME).status_code for n in ("a1", "a2")] == [201, 201]
        _quota_error(_upload(server, "a3", files, ACME))
        assert _owned(tmp_path, "acme") == ["a1", "a2"]
        assert _upload(server, "g1", files, GLOBEX).status_code == 201  # another tenant has its own quota
        assert [_upload(server, f"o{i}", files, OPS).status_code for i in range(3)] == [201] * 3  # admins: none
        assert httpx.delete(f"{server.base_url}/v1/adapters/a1", headers=admin_headers(ACME)).status_code == 200
        assert _upload(server, "a3", files, ACME).status_code == 201  # room again


def test_byte_quota_counts_what_the_tenant_stores_plus_the_upload(tiny_llama_dir: Path, tmp_path: Path, files: Files) -> None:
    size = sum(map(len, files.values()))
    with quota_server(tiny_llama_dir, tmp_path, max_adapter_bytes_per_tenant=2 * size + size // 2) as server:
        assert [_upload(server, n, files, ACME).status_code for n in ("a1", "a2")] == [201, 201]
        resp = _upload(server, "a3", files, ACME)
        _quota_error(resp)
        assert f"({size} bytes)" in resp.json()["error"]["message"]
        assert _owned(tmp_path, "acme") == ["a1", "a2"]
        assert _upload(server, "g1", files, GLOBEX).status_code == 201


@pytest.mark.parametrize("quota", [{"max_adapters_per_tenant": 2}, {"max_adapter_bytes_per_tenant": 2}], ids=["count", "bytes"])
def test_concurrent_uploads_of_one_tenant_never_pass_the_quota(
    tiny_llama_dir: Path, tmp_path: Path, files: Files, quota: dict[str, int]
) -> None:
    size = sum(map(len, files.values()))
    quota = {k: v * size if "bytes" in k else v for k, v in quota.items()}  # room for two either way

    async def burst(server: LiveServer) -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=admin_headers(ACME), timeout=120) as client:
            sent = [client.post("/v1/adapters", **upload_form(f"c{i}", files)) for i in range(6)]
            return [r.status_code for r in await asyncio.gather(*sent)]

    with quota_server(tiny_llama_dir, tmp_path, **quota) as server:
        statuses = asyncio.run(burst(server))
        assert sorted(statuses) == [201, 201, 403, 403, 403, 403]
        assert len(_owned(tmp_path, "acme")) == 2
        assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")]


def test_a_tenant_at_its_quota_is_refused_before_the_body_is_sent(tiny_llama_dir: Path, tmp_path: Path, files: Files) -> None:
    with quota_server(tiny_llama_dir, tmp_path, max_adapters_per_tenant=1) as server:
        assert _upload(server, "a1", files, ACME).status_code == 201
        url = urlparse(server.base_url)
        head = (
            f"POST /v1/adapters HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {ACME}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        )
        with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
            sock.sendall(head.encode())  # and no body at all
            reply = sock.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 403") and '"quota_exceeded"' in reply
