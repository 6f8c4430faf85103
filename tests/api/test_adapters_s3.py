"""Adapters in S3 through the HTTP API, against a real S3 API (moto's server on 127.0.0.1).

vLLM's /v1/load_lora_adapter with an s3:// lora_path under an s3:// --allowed-lora-dir entry; the
ETag cache (a second load of unchanged objects reads nothing: counted in the store's own request log);
refusals (4xx in OpenAI's shape) that change nothing: no adapter registered, nothing cached, nothing
written to the bucket. The outputs of an adapter read from S3 are checked against HF PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
from tests.api.adapter_helpers import (
    ADMIN,
    admin_headers,
    chat_prompt_ids,
    peft_greedy,
    sha256_of,
    tiny_engine_with,
    token_texts,
)
from tests.api.live_server import LiveServer, live_server
from tests.lora.s3_helpers import LocalS3, credentials_refused

USER = "sk-user"
MESSAGES = [{"role": "user", "content": "Load me from S3."}]
MAX_ADAPTER_BYTES = 1 << 20


@pytest.fixture(scope="module")
def bucket(s3: LocalS3, r4_versions, tmp_path_factory: pytest.TempPathFactory) -> str:
    _, r4, _ = r4_versions
    name = s3.new_bucket()
    for prefix in ("allowed/r4-attn", "outside/r4-attn", "allowedx/r4-attn"):
        s3.put_adapter(name, prefix, r4)
    junk = tmp_path_factory.mktemp("junk")
    shutil.copy(r4 / CONFIG_FILE, junk / CONFIG_FILE)
    (junk / WEIGHTS_FILE).write_bytes(os.urandom(MAX_ADAPTER_BYTES + 1))
    s3.put_adapter(name, "allowed/big", junk)
    (junk / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    s3.put_adapter(name, "allowed/broken", junk)
    s3.put_adapter(name, "allowed/no-config", r4, files=(WEIGHTS_FILE,))
    s3.client.put_object(Bucket=name, Key="allowed/pickled/adapter_config.json", Body=(r4 / CONFIG_FILE).read_bytes())
    s3.client.put_object(Bucket=name, Key="allowed/pickled/adapter_model.bin", Body=b"\x80\x02}q\x00.")
    return name


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapter_cache_dir, reached through a symlink (as a cache on another volume is): files read from it
    are checked against where they really lie."""
    root = tmp_path_factory.mktemp("s3-cache")
    (root / "real").mkdir()
    os.symlink(root / "real", root / "link")
    return root / "link"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, bucket: str, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    lora = {
        "allowed_lora_dir": [f"s3://{bucket}/allowed", f"s3://missing-{bucket}"],
        "adapter_cache_dir": cache,
        "max_adapter_bytes": MAX_ADAPTER_BYTES,
    }
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store"), **lora) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", api_key=USER, admin_api_key=ADMIN)) as live:
            yield live


def _load(server: LiveServer, name: str, path: str, key: str = ADMIN) -> httpx.Response:
    body = json.dumps({"lora_name": name, "lora_path": path})  # ASCII-escaped: a lone surrogate travels as JSON's \ud800
    headers = {**admin_headers(key), "Content-Type": "application/json"}
    return httpx.post(f"{server.base_url}/v1/load_lora_adapter", content=body, headers=headers, timeout=60)


def _unload(server: LiveServer, name: str) -> None:
    resp = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin_headers(), timeout=60)
    assert resp.status_code == 200, resp.text


def _error(resp: httpx.Response) -> tuple[int, str, str | None]:
    error = resp.json()["error"]
    return resp.status_code, error["type"], error["param"]


def _stored(server: LiveServer, s3: LocalS3, bucket: str, cache: Path) -> tuple:
    """Everything a refused load must leave as it was: the models served, the cache, the bucket."""
    models = [m.id for m in server.client(api_key=USER).models.list().data]
    return models, sorted(os.listdir(cache)), s3.keys(bucket)


def test_an_adapter_loaded_from_s3_computes_what_peft_does(server: LiveServer, bucket: str, r4_versions) -> None:
    peft_model, r4, _ = r4_versions
    url = f"s3://{bucket}/allowed/r4-attn"
    assert _load(server, "from-s3", url, key=USER).status_code == 401  # an admin's route
    resp = _load(server, "from-s3", url)
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert (info["origin"], info["path"], info["sha256"]) == ("load-api", url, sha256_of(r4 / WEIGHTS_FILE))

    prompt = chat_prompt_ids(server.engine.tokenizer, MESSAGES)
    expected = token_texts(server.engine.tokenizer, peft_greedy(peft_model, "r4-attn", prompt, 6))
    reply = server.client(api_key=USER).chat.completions.create(
        model="from-s3", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert [t.token for t in reply.choices[0].logprobs.content] == expected
    card = httpx.get(f"{server.base_url}/v1/models/from-s3", headers=admin_headers(USER)).json()
    assert card["root"] == "r4-attn"  # a user sees no server location
    _unload(server, "from-s3")


@pytest.mark.parametrize(
    ("lora_path", "status", "param"),
    [
        ("s3://{bucket}/outside/r4-attn", 403, "lora_path"),
        ("s3://{bucket}/allowedx/r4-attn", 403, "lora_path"),  # a prefix of the entry's name, not a folder under it
        ("s3://{bucket}", 403, "lora_path"),
        ("s3://{bucket}/allowed/../outside/r4-attn", 400, "lora_path"),
        ("s3://{bucket}/allowed//r4-attn", 400, "lora_path"),
        ("s3://Not_A_Bucket/allowed/r4-attn", 400, "lora_path"),
        ("s3:/{bucket}/allowed/r4-attn", 403, "lora_path"),  # a local path, outside every local entry (there are none)
        ("gs://{bucket}/allowed/r4-attn", 400, "lora_path"),
        ("s3://{bucket}/allowed/r4\ud800", 400, "lora_path"),
        ("/allowed/r4\ud800", 400, "lora_path"),
        ("s3://{bucket}/allowed/missing", 404, "lora_path"),
        ("s3://missing-{bucket}/r4-attn", 404, "lora_path"),
        ("s3://{bucket}/allowed/big", 413, "lora_path"),
        ("s3://{bucket}/allowed/pickled", 415, "adapter_model"),
        ("s3://{bucket}/allowed/no-config", 400, "adapter_config"),
        ("s3://{bucket}/allowed/broken", 400, "adapter_model"),
    ],
)
def test_load_refused_changes_nothing(
    server: LiveServer, s3: LocalS3, bucket: str, cache: Path, lora_path: str, status: int, param: str
) -> None:
    before = _stored(server, s3, bucket, cache)
    resp = _load(server, "refused", lora_path.format(bucket=bucket))
    assert _error(resp) == (status, "invalid_request_error", param)
    assert _stored(server, s3, bucket, cache) == before


def test_credentials_refused_is_a_403_that_changes_nothing(server: LiveServer, s3: LocalS3, bucket: str, cache: Path) -> None:
    before = _stored(server, s3, bucket, cache)
    with credentials_refused():
        resp = _load(server, "refused", f"s3://{bucket}/allowed/r4-attn")
    assert _error(resp) == (403, "invalid_request_error", "lora_path")
    assert "InvalidAccessKeyId" in resp.json()["error"]["message"] and "testing" not in resp.text
    assert _stored(server, s3, bucket, cache) == before


def test_a_second_load_of_unchanged_objects_reads_nothing(server: LiveServer, s3: LocalS3, bucket: str, r4_versions) -> None:
    _, r4, other = r4_versions
    url = s3.put_adapter(bucket, "allowed/versioned", r4)
    assert _load(server, "v1", url).status_code == 200
    read = s3.log.get_objects(bucket, "allowed/versioned/")
    assert sorted(read) == ["allowed/versioned/adapter_config.json", "allowed/versioned/adapter_model.safetensors"]
    _unload(server, "v1")
    again = _load(server, "v1-again", url)
    assert again.status_code == 200 and again.json()["sha256"] == sha256_of(r4 / WEIGHTS_FILE)
    assert s3.log.get_objects(bucket, "allowed/versioned/") == read  # the ETag cache: no GetObject

    s3.put_adapter(bucket, "allowed/versioned", other)  # a new version under the same keys
    newer = _load(server, "v2", url)
    assert newer.status_code == 200 and newer.json()["sha256"] == sha256_of(other / WEIGHTS_FILE)
    assert len(s3.log.get_objects(bucket, "allowed/versioned/")) == 4
    # Loaded before the change, v1-again keeps the weights it was registered with.
    info = httpx.get(f"{server.base_url}/v1/adapters/v1-again", headers=admin_headers()).json()
    assert info["sha256"] == sha256_of(r4 / WEIGHTS_FILE)
    reply = server.client(api_key=USER).completions.create(model="v1-again", prompt="still here", max_tokens=2)
    assert reply.model == "v1-again"
    _unload(server, "v1-again")
    _unload(server, "v2")
