"""lora_serve.deploy.ray_serve on a local Ray cluster: two engine replicas of the tiny Llama.

Most requests go through the ingress deployment's handle (the code behind POST
/v1/completions, with replies that carry the replica's counters); one test goes over HTTP
through Ray's proxy on a free port. Checked: four adapters answer with the same
tokens as an in-process engine; a warm adapter keeps landing on the replica that holds it;
each replica's LRU keeps at most `max_adapters_per_replica` adapters registered.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason='Ray Serve tests need ray[serve] (pip install -e ".[ray]")')
serve = pytest.importorskip("ray.serve")

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig  # noqa: E402
from lora_serve.deploy.ray_serve import build_app  # noqa: E402
from lora_serve.engine.sampling_params import SamplingParams  # noqa: E402
from tests.api.adapter_helpers import MAX_RANK, make_tiny_adapters, tiny_engine_with  # noqa: E402
from tests.lora.conftest import ATTN, MLP  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ADAPTERS = {
    "a-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "b-mlp": dict(r=2, lora_alpha=4, target_modules=MLP),
    "c-all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "d-all": dict(r=4, lora_alpha=4, target_modules="all-linear"),
}
MAX_ADAPTERS_PER_REPLICA = 1  # with 4 adapters on 2 replicas, Ray's LRU must evict
PROMPT = [1, 504, 3047, 282, 4103, 30]  # token ids: the same prompt on every side
NEW_TOKENS = 5
BASE = "tiny"


@pytest.fixture(scope="module")
def shared_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray-adapters")
    make_tiny_adapters(tiny_llama_dir, out, ADAPTERS)
    return out


def _config(tiny_llama_dir: Path, shared_dir: Path) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=256),
        lora=LoRAConfig(adapter_dir=shared_dir, max_lora_rank=MAX_RANK, max_loras=2),
    )


@pytest.fixture(scope="module")
def expected(tiny_llama_dir: Path, shared_dir: Path) -> dict[str, list[int]]:
    """Greedy tokens per adapter (and the base, "") from one in-process engine."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    async def run(engine, name: str | None) -> list[int]:
        return [t async for out in engine.generate(f"ref-{name}", PROMPT, params, name) for t in out.new_token_ids]

    with tiny_engine_with(tiny_llama_dir, shared_dir) as engine:
        return {name: asyncio.run(run(engine, name or None)) for name in ["", *ADAPTERS]}


@pytest.fixture(scope="module")
def http_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ingress(tiny_llama_dir: Path, shared_dir: Path, http_port: int) -> Iterator:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    app = build_app(
        _config(tiny_llama_dir, shared_dir),
        BASE,
        num_replicas=2,
        max_adapters_per_replica=MAX_ADAPTERS_PER_REPLICA,
        num_cpus_per_replica=0.5,
        num_threads=1,
    )
    try:
        yield serve.run(app, name="lora-serve-test", route_prefix="/")
    finally:
        serve.shutdown()
        ray.shutdown()


def request(ingress, model: str) -> tuple[int, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return ingress.complete.remote(body).result(timeout_s=60)


def complete(ingress, model: str) -> dict:
    status, reply = request(ingress, model)
    assert status == 200, reply
    return reply


def test_every_adapter_answers_like_an_in_process_engine(ingress, expected) -> None:
    assert expected[""] not in [expected[name] for name in ADAPTERS]  # the adapters change the answer
    for model in [BASE, *ADAPTERS, f"{BASE}:c-all"]:
        reply = complete(ingress, model)
        assert reply["lora_serve"]["token_ids"] == expected[model.removeprefix(f"{BASE}:").removeprefix(BASE)], model
        assert reply["model"] == model and reply["usage"]["completion_tokens"] == NEW_TOKENS


def test_a_warm_adapter_stays_on_its_replica(ingress) -> None:
    for name in ("a-attn", "b-mlp"):
        first = complete(ingress, name)["lora_serve"]
        time.sleep(1.5)  # the replica reports its adapters to Ray's routers asynchronously
        replies = [complete(ingress, name)["lora_serve"] for _ in range(4)]
        assert {r["replica"] for r in replies} == {first["replica"]}
        assert all(name in r["registered"] for r in replies)
        assert replies[-1]["num_adapter_loads"] == first["num_adapter_loads"]  # no reload
        assert replies[-1]["replica_requests"][name] - first["replica_requests"][name] == 4


def test_each_replica_keeps_at_most_its_lru_share(ingress, expected) -> None:
    replies = [complete(ingress, name)["lora_serve"] for name in [*ADAPTERS, *ADAPTERS]]
    assert all(len(r["registered"]) <= MAX_ADAPTERS_PER_REPLICA for r in replies)
    assert [r["token_ids"] for r in replies] == [expected[n] for n in [*ADAPTERS, *ADAPTERS]]  # reloads answer alike
    last = {r["replica"]: r for r in replies}
    assert len(last) == 2
    assert sum(r["num_adapter_loads"] for r in last.values()) > len(ADAPTERS)  # evicted, then loaded again


@pytest.mark.parametrize("model", ["no-such-adapter", "..", ".hidden", "../ray-adapters0/a-attn"])
def test_unknown_or_escaping_adapter_is_404(ingress, model: str) -> None:
    status, reply = request(ingress, model)
    assert status == 404 and reply["error"]["code"] == "model_not_found"


def test_bad_request_names_the_param(ingress) -> None:
    status, reply = ingress.complete.remote({"model": BASE, "prompt": PROMPT, "max_tokens": 0}).result(timeout_s=60)
    assert status == 400 and reply["error"]["param"] == "max_tokens"


def test_http_ingress_speaks_openai(ingress, expected, http_port: int) -> None:
    base_url = f"http://127.0.0.1:{http_port}"
    assert httpx.get(f"{base_url}/health", timeout=30).json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]] == [BASE, *sorted(ADAPTERS)]
    body = {"model": "c-all", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["object"] == "text_completion"
    assert reply.json()["lora_serve"]["token_ids"] == expected["c-all"]
    bad = httpx.post(f"{base_url}/v1/completions", content=b"not json", timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
