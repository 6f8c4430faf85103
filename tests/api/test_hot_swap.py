"""Eight adapters, two device slots, three CPU copies: 24 concurrent requests, each answered as PEFT does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.adapter_helpers import make_tiny_adapters, modules_server, peft_greedy, token_texts
from tests.api.live_server import LiveServer
from tests.lora.conftest import ATTN, MLP

MAX_LORAS, MAX_CPU_LORAS = 2, 3
NEW_TOKENS = 6
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
ADAPTERS = {
    "a-r2-q": dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
    "b-r4-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "c-r8-mlp": dict(r=8, lora_alpha=16, target_modules=MLP),
    "d-r16-all": dict(r=16, lora_alpha=16, target_modules="all-linear"),
    "e-r4-ov": dict(r=4, lora_alpha=16, target_modules=["o_proj", "v_proj"]),
    "f-r8-rslora": dict(r=8, lora_alpha=8, target_modules=ATTN + MLP, use_rslora=True),
    "g-r2-down": dict(r=2, lora_alpha=8, target_modules=["down_proj"]),
    "h-r8-pattern": dict(r=8, lora_alpha=16, target_modules=ATTN, rank_pattern={"k_proj": 4}),
}


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), ADAPTERS, seed=1)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = peft
    store = tmp_path_factory.mktemp("store")
    with modules_server(tiny_llama_dir, paths, store, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS) as live:
        yield live


def test_concurrent_requests_over_more_adapters_than_slots(server: LiveServer, peft) -> None:
    peft_model, _ = peft
    tokenizer = server.engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = {
        (name, i): token_texts(tokenizer, peft_greedy(peft_model, name, prompt, NEW_TOKENS))
        for name in ADAPTERS
        for i, prompt in enumerate(prompts)
    }

    async def one(client: openai.AsyncOpenAI, name: str, i: int) -> list[str]:
        resp = await client.completions.create(
            model=name,
            prompt=prompts[i],
            max_tokens=NEW_TOKENS,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        return resp.choices[0].logprobs.tokens

    async def run_all() -> dict[tuple[str, int], list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        async with client:
            keys = list(expected)
            answers = await asyncio.gather(*(one(client, name, i) for name, i in keys))
        return dict(zip(keys, answers))

    got = asyncio.run(run_all())
    assert got == expected
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS)  # adapters really differ from each other
    lora = server.engine.adapters
    assert len(lora._cpu) <= MAX_CPU_LORAS
    assert len(lora.residency.names()) <= MAX_LORAS
    assert lora.num_loads > 0 and lora.num_evictions > 0  # adapters really moved disk -> CPU -> slots and out
