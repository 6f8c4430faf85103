"""--adapter-dir s3://bucket/prefix, against a real S3 API (moto's server on 127.0.0.1).

Its sub-prefixes are registered at start; a name first used later is looked up under the prefix
(vLLM's LoRA resolver idea), concurrent first requests downloading it once; only names of that
one-segment grammar are looked up, so no tenant makes the server read any other key. The server
writes nothing there: uploads are refused. --lora-modules takes s3:// too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.lora.lora_model import WEIGHTS_FILE
from tests.api.adapter_helpers import (
    ADMIN,
    adapter_files,
    admin_headers,
    chat_prompt_ids,
    peft_greedy,
    sha256_of,
    tiny_engine_with,
    token_texts,
    upload,
)
from tests.api.live_server import LiveServer, live_server
from tests.lora.s3_helpers import LocalS3, credentials_refused
from tests.train.test_example_adapters import ADAPTERS_DIR, HELDOUT, SHIPPED, is_pirate

TENANT = "sk-acme-user"
KEYS = {"keys": [{"key": TENANT, "tenant": "acme", "role": "user"}, {"key": ADMIN, "tenant": "ops", "role": "admin"}]}
MESSAGES = [{"role": "user", "content": "Resolve me."}]


@pytest.fixture(scope="module")
def bucket(s3: LocalS3, r4_versions) -> str:
    _, r4, _ = r4_versions
    name = s3.new_bucket()
    s3.put_adapter(name, "dir/at-start", r4)
    s3.put_adapter(name, "modules/sql", r4)
    s3.put_adapter(name, "private/secret", r4)  # outside the adapter dir: no request may reach it
    return name


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("dir-s3")
    (root / "keys.json").write_text(json.dumps(KEYS))
    lora = {"lora_modules": [f"sql=s3://{bucket}/modules/sql"], "adapter_cache_dir": root / "cache"}
    with tiny_engine_with(tiny_llama_dir, f"s3://{bucket}/dir", **lora) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", auth_file=root / "keys.json")) as live:
            yield live


def _models(server: LiveServer, key: str = TENANT) -> list[str]:
    return [m.id for m in server.client(api_key=key).models.list().data]


def _greedy(server: LiveServer, model: str) -> list[str]:
    reply = server.client(api_key=TENANT).chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    return [t.token for t in reply.choices[0].logprobs.content]


def test_registered_at_start(server: LiveServer, bucket: str) -> None:
    assert _models(server) == ["tiny", "at-start", "sql"]
    described = {a["name"]: a for a in httpx.get(f"{server.base_url}/v1/adapters", headers=admin_headers()).json()["data"]}
    assert (described["at-start"]["origin"], described["at-start"]["path"]) == ("adapter-dir", f"s3://{bucket}/dir/at-start")
    assert (described["sql"]["origin"], described["sql"]["path"]) == ("lora-modules", f"s3://{bucket}/modules/sql")
    seen = httpx.get(f"{server.base_url}/v1/adapters/at-start", headers=admin_headers(TENANT)).json()
    assert seen["path"] == "at-start"  # a tenant sees no server location


def test_a_name_first_used_after_the_start_is_resolved_and_computes_what_peft_does(
    server: LiveServer, s3: LocalS3, bucket: str, r4_versions
) -> None:
    peft_model, r4, _ = r4_versions
    s3.put_adapter(bucket, "dir/later", r4)
    assert "later" not in _models(server)
    prompt = chat_prompt_ids(server.engine.tokenizer, MESSAGES)
    assert _greedy(server, "later") == token_texts(server.engine.tokenizer, peft_greedy(peft_model, "r4-attn", prompt, 6))
    assert "later" in _models(server)
    assert _greedy(server, "tiny:later") == _greedy(server, "later")


def test_concurrent_first_requests_download_once(server: LiveServer, s3: LocalS3, bucket: str, r4_versions) -> None:
    _, r4, _ = r4_versions
    s3.put_adapter(bucket, "dir/burst", r4)
    answers: list[str] = []
    start = threading.Barrier(6)

    def ask() -> None:
        start.wait()
        reply = server.client(api_key=TENANT).completions.create(model="burst", prompt="together", max_tokens=2)
        answers.append(reply.model)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["burst"] * 6
    assert sorted(s3.log.get_objects(bucket, "dir/burst/")) == ["dir/burst/adapter_config.json", "dir/burst/adapter_model.safetensors"]


@pytest.mark.parametrize(
    "model",
    [
        "nothing-here",
        "../private/secret",
        "private/secret",
        "dir/at-start",
        "s3://{bucket}/private/secret",
        "tiny:../private/secret",
        ".hidden",
    ],
)
def test_only_names_under_the_prefix_are_looked_up(server: LiveServer, s3: LocalS3, bucket: str, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        server.client(api_key=TENANT).completions.create(model=model.format(bucket=bucket), prompt="hi", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    assert s3.log.get_objects(bucket, "private/") == []
    assert "secret" not in _models(server, ADMIN)


def test_uploads_are_refused_and_the_bucket_is_untouched(server: LiveServer, s3: LocalS3, bucket: str, r4_versions) -> None:
    _, r4, _ = r4_versions
    before = s3.keys(bucket)
    for key in (TENANT, ADMIN):
        resp = upload(server.base_url, "uploaded", adapter_files(r4), api_key=key)
        error = resp.json()["error"]
        assert (resp.status_code, error["type"], error["code"]) == (403, "invalid_request_error", "uploads_disabled")
        assert f"s3://{bucket}/dir" in error["message"]
    assert s3.keys(bucket) == before
    assert "uploaded" not in _models(server, ADMIN)


def test_an_adapter_keeps_its_version_until_unloaded(server: LiveServer, s3: LocalS3, bucket: str, r4_versions) -> None:
    _, r4, other = r4_versions
    s3.put_adapter(bucket, "dir/versioned", r4)
    first = _greedy(server, "versioned")
    s3.put_adapter(bucket, "dir/versioned", other)
    assert _greedy(server, "versioned") == first
    resp = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "versioned"}, headers=admin_headers())
    assert resp.status_code == 200
    assert _greedy(server, "versioned") != first  # read again on its next use: the new weights
    info = httpx.get(f"{server.base_url}/v1/adapters/versioned", headers=admin_headers()).json()
    assert info["sha256"] == sha256_of(other / WEIGHTS_FILE)


def test_a_store_that_refuses_the_server_is_a_502_naming_no_location(server: LiveServer, s3: LocalS3, bucket: str, r4_versions) -> None:
    _, r4, _ = r4_versions
    s3.put_adapter(bucket, "dir/refused", r4)
    with credentials_refused(), pytest.raises(openai.APIStatusError) as exc:
        server.client(api_key=TENANT).completions.create(model="refused", prompt="hi", max_tokens=2)
    assert exc.value.status_code == 502
    assert (exc.value.body["code"], exc.value.body["param"]) == ("source_unavailable", "model")
    assert bucket not in exc.value.body["message"]
    assert "refused" not in _models(server, ADMIN)
    assert server.client(api_key=TENANT).completions.create(model="refused", prompt="hi", max_tokens=2).model == "refused"


@pytest.mark.slow
def test_the_shipped_adapters_served_from_s3(s3: LocalS3, default_model_dir: Path, tmp_path: Path) -> None:
    """adapters/ (trained with `lora-serve train`) in a bucket, served by the embedded model from an s3:// --adapter-dir."""
    bucket = s3.new_bucket()
    for name in SHIPPED:
        s3.put_adapter(bucket, f"shipped/{name}", ADAPTERS_DIR / name)
    config = EngineConfig(
        model=ModelConfig(model=str(default_model_dir)),
        cache=CacheConfig(kv_cache_memory_gb=0.1),
        scheduler=SchedulerConfig(max_model_len=512),
        lora=LoRAConfig(adapter_dir=f"s3://{bucket}/shipped", adapter_cache_dir=tmp_path),
    )
    engine = AsyncEngine.from_config(config)
    try:
        with live_server(engine, ServerConfig()) as live:
            described = httpx.get(f"{live.base_url}/v1/adapters", timeout=30).json()["data"]
            assert {a["name"]: a["sha256"] for a in described} == {n: sha256_of(ADAPTERS_DIR / n / WEIGHTS_FILE) for n in SHIPPED}
            question = HELDOUT[0]
            reply = live.client().chat.completions.create(
                model="pirate", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
            )
            assert is_pirate(reply.choices[0].message.content)
    finally:
        engine.shutdown()
