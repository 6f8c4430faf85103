"""lora_serve.deploy.ray_serve on a local Ray cluster: two engine replicas of the tiny Llama.

Everything goes over HTTP through Ray's proxy on a free port, as a client would: the `openai`
client, or httpx for raw server-sent events. A single-process server on an in-process engine
with the same adapters is the reference. Checked: every adapter answers with the same greedy
tokens; chat and completions stream with the same chunks, byte for byte but for ids and
times (logprobs to 3 decimals); errors have OpenAI's shape and status; a warm adapter keeps landing on the replica that
holds it; each replica's LRU keeps at most `max_adapters_per_replica` adapters registered.
Non-streamed replies carry `lora_serve` (token ids, replica, its counters) for these checks.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason='Ray Serve tests need ray[serve] (pip install -e ".[ray]")')
serve = pytest.importorskip("ray.serve")

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, RayConfig, SchedulerConfig, ServerConfig  # noqa: E402
from lora_serve.deploy.ray_serve import build_app  # noqa: E402
from lora_serve.engine.sampling_params import SamplingParams  # noqa: E402
from tests.api.adapter_helpers import MAX_RANK, chat_prompt_ids, make_tiny_adapters, tiny_engine_with, token_texts  # noqa: E402
from tests.api.live_server import LiveServer, live_server  # noqa: E402
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
MESSAGES = [{"role": "user", "content": "Name a colour."}]
NEW_TOKENS = 5
BASE = "tiny"
GREEDY = {"max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def shared_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray-adapters")
    make_tiny_adapters(tiny_llama_dir, out, ADAPTERS)
    return out


def _config(tiny_llama_dir: Path, shared_dir: Path) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", num_threads=1),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=256),
        lora=LoRAConfig(adapter_dir=shared_dir, max_lora_rank=MAX_RANK, max_loras=2),
    )


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, shared_dir: Path) -> Iterator[LiveServer]:
    """The single-process server, in this process, on the same adapters."""
    with tiny_engine_with(tiny_llama_dir, shared_dir) as engine, live_server(engine, ServerConfig(served_model_name=BASE)) as live:
        yield live


@pytest.fixture(scope="module")
def expected(reference: LiveServer) -> dict[tuple[str, str], list[int]]:
    """Greedy token ids per (adapter or "" for the base, "prompt" | "chat"), from the in-process engine."""
    engine = reference.engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    prompts = {"prompt": PROMPT, "chat": chat_prompt_ids(engine.tokenizer, MESSAGES)}

    async def run(name: str, kind: str) -> list[int]:
        outputs = engine.generate(f"ref-{name}-{kind}", prompts[kind], params, name or None)
        return [t async for out in outputs for t in out.new_token_ids]

    return {(name, kind): asyncio.run(run(name, kind)) for name in ["", *ADAPTERS] for kind in prompts}


@pytest.fixture(scope="module")
def http_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_llama_dir: Path, shared_dir: Path, http_port: int) -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    replicas = RayConfig(num_replicas=2, max_adapters_per_replica=MAX_ADAPTERS_PER_REPLICA, num_cpus_per_replica=0.5)
    app = build_app(_config(tiny_llama_dir, shared_dir), ServerConfig(served_model_name=BASE), replicas)
    try:
        serve.run(app, name="lora-serve-test", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def request(base_url: str, model: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json={"model": model, "prompt": PROMPT, **GREEDY}, timeout=60)


def complete(base_url: str, model: str) -> dict:
    reply = request(base_url, model)
    assert reply.status_code == 200, reply.text
    return reply.json()


def sse(base_url: str, path: str, body: dict) -> list[str]:
    """The `data:` payloads of one streamed request."""
    with httpx.stream("POST", f"{base_url}/v1/{path}", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]


def _without_ids(events: list[str]) -> list[dict | str]:
    """Events without their id and time; logprobs rounded (the replicas run torch on one thread, so
    their sums add up in another order)."""

    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items() if k not in ("id", "created")}
        return [rounded(v) for v in value] if isinstance(value, list) else value

    return [e if e == "[DONE]" else rounded(json.loads(e)) for e in events]


def test_every_adapter_answers_like_an_in_process_engine(ray_url: str, expected) -> None:
    assert expected["", "prompt"] not in [expected[name, "prompt"] for name in ADAPTERS]  # adapters change the answer
    for model in [BASE, *ADAPTERS, f"{BASE}:c-all"]:
        reply = complete(ray_url, model)
        name = model.removeprefix(f"{BASE}:").removeprefix(BASE)
        assert reply["lora_serve"]["token_ids"] == expected[name, "prompt"], model
        assert reply["model"] == model and reply["object"] == "text_completion"
        assert reply["usage"]["completion_tokens"] == NEW_TOKENS


def test_chat_streams_the_in_process_engine_tokens(ray_url: str, reference: LiveServer, expected) -> None:
    for model in ["c-all", BASE]:
        stream = _client(ray_url).chat.completions.create(
            model=model,
            messages=MESSAGES,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        ids = expected[model.removeprefix(BASE), "chat"]
        assert tokens == token_texts(reference.engine.tokenizer, ids), model
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == NEW_TOKENS
        whole = _client(ray_url).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert whole.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_streams_are_the_single_process_server_events(ray_url: str, reference: LiveServer, path: str) -> None:
    prompt = {"messages": MESSAGES} if path == "chat/completions" else {"prompt": PROMPT, "logprobs": 2}
    body = {"model": f"{BASE}:a-attn", **prompt, **GREEDY, "stream_options": {"include_usage": True}}
    events = sse(ray_url, path, body)
    assert events[-1] == "[DONE]"
    assert _without_ids(events) == _without_ids(sse(reference.base_url, path, body))


def test_a_warm_adapter_stays_on_its_replica(ray_url: str) -> None:
    for name in ("a-attn", "b-mlp"):
        first = complete(ray_url, name)["lora_serve"]
        time.sleep(1.5)  # the replica reports its adapters to Ray's routers asynchronously
        replies = [complete(ray_url, name)["lora_serve"] for _ in range(4)]
        assert {r["replica"] for r in replies} == {first["replica"]}
        assert all(name in r["registered"] for r in replies)
        assert replies[-1]["num_adapter_loads"] == first["num_adapter_loads"]  # no reload
        assert replies[-1]["replica_requests"][name] - first["replica_requests"][name] == 4


def test_each_replica_keeps_at_most_its_lru_share(ray_url: str, expected) -> None:
    replies = [complete(ray_url, name)["lora_serve"] for name in [*ADAPTERS, *ADAPTERS]]
    assert all(len(r["registered"]) <= MAX_ADAPTERS_PER_REPLICA for r in replies)
    # Reloads after eviction answer alike.
    assert [r["token_ids"] for r in replies] == [expected[n, "prompt"] for n in [*ADAPTERS, *ADAPTERS]]
    last = {r["replica"]: r for r in replies}
    assert len(last) == 2
    assert sum(r["num_adapter_loads"] for r in last.values()) > len(ADAPTERS)  # evicted, then loaded again


@pytest.mark.parametrize("model", ["no-such-adapter", "..", ".hidden", "../ray-adapters0/a-attn"])
def test_unknown_or_escaping_adapter_is_404(ray_url: str, reference: LiveServer, model: str) -> None:
    reply = request(ray_url, model)
    assert reply.status_code == 404 and reply.json() == request(reference.base_url, model).json()
    with pytest.raises(openai.NotFoundError) as info:  # streamed: refused before the stream starts
        _client(ray_url).chat.completions.create(model=model, messages=MESSAGES, stream=True)
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ("chat/completions", {"model": BASE, "messages": [], "stream": True}, "messages"),
        ("chat/completions", {"model": BASE, "messages": MESSAGES, "n": 2}, "n"),
        ("completions", {"model": "c-all", "prompt": PROMPT, "max_tokens": 300}, "max_tokens"),  # past max_model_len
    ],
)
def test_bad_request_is_400_naming_the_param(ray_url: str, path: str, body: dict, param: str) -> None:
    reply = httpx.post(f"{ray_url}/v1/{path}", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_health_models_and_non_json(ray_url: str) -> None:
    assert httpx.get(f"{ray_url}/health", timeout=30).json() == {"status": "ok"}
    assert [m.id for m in _client(ray_url).models.list().data] == [BASE, *sorted(ADAPTERS)]
    bad = httpx.post(f"{ray_url}/v1/completions", content=b"not json", timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
