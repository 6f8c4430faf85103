"""Prefix caching through the HTTP API: usage.prompt_tokens_details.cached_tokens as the openai client
reads it, streamed and not, per adapter; an adapter deleted and uploaded again under its name reuses
nothing; vLLM's prefix-cache counters on /metrics, in all and per adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import ADMIN, adapter_files, admin_headers, make_tiny_adapters, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server
from tests.api.test_metrics import samples, scrape

BLOCK = 16  # CacheConfig's default block_size
SYSTEM = [(29 * j) % 3000 + 200 for j in range(40)]  # 2 full blocks and 8 tokens


@pytest.fixture(scope="module")
def peft_paths(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    modules = [f"{name}={path}" for name, path in peft_paths.items()]
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store"), lora_modules=modules) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny")) as live:
            yield live


def complete(server: LiveServer, model: str, prompt: list[int], stream: bool = False):
    client = server.client(api_key=ADMIN)
    kwargs = dict(model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    return chunks[-1]


def cached(resp) -> int:
    return resp.usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_per_model(server: LiveServer) -> None:
    prompt = SYSTEM + [7, 8, 9]
    first = complete(server, "tiny", prompt)
    assert cached(first) == 0 and first.usage.prompt_tokens == len(prompt)
    again = complete(server, "tiny", prompt)
    assert cached(again) == 2 * BLOCK and again.choices[0].text == first.choices[0].text
    streamed = complete(server, "tiny", SYSTEM + [1, 2], stream=True)
    assert cached(streamed) == 2 * BLOCK
    assert cached(complete(server, "r4-attn", prompt)) == 0  # other weights: nothing shared
    assert cached(complete(server, "r4-attn", prompt)) == 2 * BLOCK


def test_chat_reports_cached_tokens(server: LiveServer) -> None:
    client = server.client(api_key=ADMIN)
    messages = [{"role": "system", "content": "You answer in one word. " * 8}, {"role": "user", "content": "Hi"}]
    kwargs = dict(model="r8-all", messages=messages, max_tokens=3, temperature=0)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // BLOCK * BLOCK > 0


def test_an_adapter_uploaded_again_under_its_name_reuses_nothing(server: LiveServer, peft_paths: dict[str, Path]) -> None:
    prompt = SYSTEM + [3, 4]
    assert upload(server.base_url, "up", adapter_files(peft_paths["r4-attn"])).status_code == 201
    complete(server, "up", prompt)
    assert cached(complete(server, "up", prompt)) == 2 * BLOCK
    assert httpx.delete(f"{server.base_url}/v1/adapters/up", headers=admin_headers()).status_code == 200
    assert upload(server.base_url, "up", adapter_files(peft_paths["r2-mlp"])).status_code == 201
    fresh = complete(server, "up", prompt)
    assert cached(fresh) == 0
    assert fresh.choices[0].text == complete(server, "r2-mlp", prompt).choices[0].text  # the new weights' answer


def test_metrics_count_prefix_cache_queries_and_hits(server: LiveServer) -> None:
    before = scrape(server)
    complete(server, "tiny", SYSTEM + [11])
    after = scrape(server)
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        assert after[name].type == "counter"
    queries = samples(after["vllm:prefix_cache_queries"], "vllm:prefix_cache_queries_total")[()]
    hits = samples(after["vllm:prefix_cache_hits"], "vllm:prefix_cache_hits_total")[()]
    assert queries - samples(before["vllm:prefix_cache_queries"], "vllm:prefix_cache_queries_total")[()] == len(SYSTEM) + 1
    assert hits - samples(before["vllm:prefix_cache_hits"], "vllm:prefix_cache_hits_total")[()] == 2 * BLOCK


def test_metrics_count_prefix_cache_queries_and_hits_per_adapter(server: LiveServer) -> None:
    prompt = [(31 * j) % 3000 + 300 for j in range(40)] + [5]  # no other test sends it: cold for every model

    def counts() -> dict[str, tuple[float, float]]:
        m = scrape(server)
        assert m["lora_serve_prefix_cache_queries"].type == m["lora_serve_prefix_cache_hits"].type == "counter"
        queries = samples(m["lora_serve_prefix_cache_queries"], "lora_serve_prefix_cache_queries_total")
        hits = samples(m["lora_serve_prefix_cache_hits"], "lora_serve_prefix_cache_hits_total")
        return {dict(k)["adapter"]: (queries[k], hits.get(k, 0.0)) for k in queries}

    before = counts()
    assert [cached(complete(server, "r2-mlp", prompt)) for _ in range(3)] == [0, 2 * BLOCK, 2 * BLOCK]
    assert cached(complete(server, "tiny", prompt)) == 0  # the base computes other K/V: a miss of its own
    after = counts()

    def delta(adapter: str) -> tuple[float, float]:
        old = before.get(adapter, (0.0, 0.0))
        return after[adapter][0] - old[0], after[adapter][1] - old[1]

    assert delta("r2-mlp") == (3 * len(prompt), 2 * 2 * BLOCK)
    assert delta("") == (len(prompt), 0)  # the base model's series
    assert all(delta(name) == (0, 0) for name in after if name not in ("", "r2-mlp"))
