"""POST /v1/adapters/{name}/merge and /unmerge on a live server: every request keeps its own model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import ADMIN, admin_headers, make_tiny_adapters, peft_greedy, tiny_engine_with, token_texts
from tests.api.live_server import LiveServer, live_server

NEW_TOKENS = 8
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = peft
    modules = [f"{name}={path}" for name, path in paths.items()]
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store"), lora_modules=modules) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny", admin_api_key=ADMIN)) as live:
            yield live


def post(server: LiveServer, path: str, key: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1{path}", headers=admin_headers(key), timeout=60)


async def answers(server: LiveServer, models: list[str], n: int = NEW_TOKENS) -> list[list[str]]:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    async with client:
        resps = await asyncio.gather(*(
            client.completions.create(model=m, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
            for m in models
        ))  # fmt: skip
    return [r.choices[0].logprobs.tokens for r in resps]


def test_merge_serves_everyone_their_own_model_and_unmerge_is_exact(server: LiveServer, peft) -> None:
    peft_model, _ = peft
    tok = server.engine.tokenizer
    prompt = tok.encode(PROMPT)
    plan = {"r8-all": "r8-all", "tiny": None, "r4-attn": "r4-attn", "r2-mlp": "r2-mlp"}
    expected = [token_texts(tok, peft_greedy(peft_model, adapter, prompt, NEW_TOKENS)) for adapter in plan.values()]
    weights = {k: v.clone() for k, v in server.engine.engine.model.state_dict().items()}

    r = post(server, "/adapters/r8-all/merge")
    assert r.status_code == 200 and r.json()["merged"] is True
    cards = {c["id"]: c for c in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
    assert cards["r8-all"]["merged"] is True and cards["r4-attn"]["merged"] is False
    assert asyncio.run(answers(server, list(plan))) == expected  # merged, base and others in one batch

    r = post(server, "/adapters/r8-all/unmerge")
    assert r.status_code == 200 and r.json()["merged"] is False
    after = server.engine.engine.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert asyncio.run(answers(server, list(plan))) == expected


def test_merge_while_a_stream_runs_keeps_its_tokens(server: LiveServer, peft) -> None:
    peft_model, _ = peft
    tok = server.engine.tokenizer
    n = 40
    expected = "".join(token_texts(tok, peft_greedy(peft_model, "r4-attn", tok.encode(PROMPT), n)))

    async def stream_and_switch() -> str:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        async with client, httpx.AsyncClient(timeout=60) as http:
            stream = await client.completions.create(
                model="r4-attn", prompt=PROMPT, max_tokens=n, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            text, switched = "", 0
            async for chunk in stream:
                text += chunk.choices[0].text if chunk.choices else ""
                if len(text) > 5 * (switched + 1) and switched < 3:  # merge it, merge another, unmerge
                    path = ["/adapters/r4-attn/merge", "/adapters/r2-mlp/merge", "/adapters/r2-mlp/unmerge"][switched]
                    assert (await http.post(f"{server.base_url}/v1{path}", headers=admin_headers())).status_code == 200
                    switched += 1
            assert switched == 3
            return text

    assert asyncio.run(stream_and_switch()) == expected


@pytest.mark.parametrize(
    "path, key, status",
    [("/adapters/nope/merge", ADMIN, 404), ("/adapters/r8-all/merge", "wrong", 401), ("/adapters/nope/unmerge", ADMIN, 404)],
)
def test_merge_refusals(server: LiveServer, path: str, key: str, status: int) -> None:
    r = post(server, path, key)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert server.engine.adapters.merged_name is None
