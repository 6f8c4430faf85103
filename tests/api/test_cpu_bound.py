"""--max-cpu-loras is a hard bound: 20 adapters wanted at once over 4 CPU places all answer as PEFT
does, and a request that leaves while waiting for a place holds nothing afterwards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.adapter_helpers import make_tiny_adapters, modules_server, peft_greedy, token_texts
from tests.api.live_server import LiveServer
from tests.lora.conftest import ATTN, MLP

MAX_LORAS, MAX_CPU_LORAS = 2, 4
NEW_TOKENS = 4
PROMPT = "The capital of France is"
ADAPTERS = {f"t{i:02d}": dict(r=2 + 2 * (i % 3), lora_alpha=8, target_modules=ATTN if i % 2 else MLP) for i in range(20)}


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), ADAPTERS, seed=2)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = peft
    store = tmp_path_factory.mktemp("store")
    with modules_server(tiny_llama_dir, paths, store, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS) as live:
        yield live


def test_twenty_adapters_at_once_never_hold_more_than_max_cpu_loras(server: LiveServer, peft) -> None:
    peft_model, _ = peft
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.encode(PROMPT)
    expected = {name: token_texts(tokenizer, peft_greedy(peft_model, name, prompt, NEW_TOKENS)) for name in ADAPTERS}

    async def one(client: openai.AsyncOpenAI, name: str) -> list[str]:
        resp = await client.completions.create(
            model=name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
        )
        return resp.choices[0].logprobs.tokens

    async def run_all() -> dict[str, list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        async with client:
            answers = await asyncio.gather(*(one(client, name) for name in ADAPTERS))
        return dict(zip(ADAPTERS, answers))

    lora = server.engine.adapters
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:  # an outside view of the tier beside the manager's own peak counter
        while not done.is_set():
            with lora.lock:
                seen.append(len(lora._cpu) + len(lora._loading))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got = asyncio.run(run_all())
    finally:
        done.set()
        sampler.join()
    assert got == expected
    assert len({tuple(v) for v in expected.values()}) > 1  # the adapters really differ
    assert max(seen) <= MAX_CPU_LORAS
    assert lora.peak_cpu_loras == MAX_CPU_LORAS  # reached, never passed (every copy and every read counted)
    assert lora.num_loads >= len(ADAPTERS) - MAX_CPU_LORAS
    assert lora._refs == {} and not lora._loading


def test_a_request_that_leaves_while_waiting_for_a_cpu_place_holds_nothing(server: LiveServer) -> None:
    lora = server.engine.adapters
    held = list(ADAPTERS)[:MAX_CPU_LORAS]
    for name in held:  # what running requests do: every CPU place is in use
        lora.acquire(name)
    try:
        body = {"model": "t19", "prompt": PROMPT, "max_tokens": 2}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        deadline = time.monotonic() + 30
        while "t19" in lora._refs:  # the server notices the disconnect and gives the wait up
            assert time.monotonic() < deadline, "the abandoned request still holds a reference"
            time.sleep(0.01)
        assert "t19" not in lora._cpu and not lora._loading
    finally:
        for name in held:
            lora.release(name)
    resp = server.client().completions.create(model="t19", prompt=PROMPT, max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert lora._refs == {}


def test_requests_waiting_for_a_cpu_place_hold_up_no_one_else(server: LiveServer) -> None:
    lora = server.engine.adapters
    held = list(ADAPTERS)[:MAX_CPU_LORAS]
    num_waiting = 40  # more than asyncio's default thread pool has threads (at most 32)

    def body(model: str) -> dict:
        return {"model": model, "prompt": PROMPT, "max_tokens": 2}

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            waiting = [asyncio.create_task(client.post("/v1/completions", json=body("t19"))) for _ in range(num_waiting)]
            try:
                deadline = time.monotonic() + 60
                while lora._refs.get("t19", 0) < num_waiting:  # every one of them inside acquire, waiting
                    assert time.monotonic() < deadline, "the requests did not all reach acquire"
                    await asyncio.sleep(0.01)
                resident = await client.post("/v1/completions", json=body(held[0]), timeout=30)  # served meanwhile
            finally:
                for name in held:
                    lora.release(name)
            return resident, await asyncio.gather(*waiting)

    for name in held:  # every CPU place in use
        lora.acquire(name)
    resident, waited = asyncio.run(run())
    assert resident.status_code == 200, resident.text
    assert [r.status_code for r in waited] == [200] * num_waiting
    assert lora._refs == {}
