"""The `adapters` field: weighted composition and per-request scale over HTTP, against PEFT's
add_weighted_adapter("cat"), beside plain adapters and the base in one batch; and its bad inputs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.adapter_helpers import TINY_ADAPTERS, make_tiny_adapters, modules_server, peft_greedy, token_texts
from tests.api.live_server import LiveServer

NEW_TOKENS = 6
MAX_LORAS = 2  # a composition of two takes both: plain requests and compositions queue for each other
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
COMPOSED = {"r8-all": 0.7, "r2-mlp": 0.5}
SCALED = {"r4-attn": 0.5}
NEGATIVE = {"r4-attn": -1.5, "r8-all": 0.25}


def _peft_name(weights: dict[str, float]) -> str:
    return "composed-" + "_".join(f"{n}x{w}".replace(".", "p").replace("-", "m") for n, w in weights.items())


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    peft_model, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), TINY_ADAPTERS, seed=2)
    for weights in (COMPOSED, SCALED, NEGATIVE):
        peft_model.add_weighted_adapter(list(weights), list(weights.values()), _peft_name(weights), combination_type="cat")
    return peft_model, paths


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = peft
    with modules_server(tiny_llama_dir, paths, tmp_path_factory.mktemp("store"), max_loras=MAX_LORAS) as live:
        yield live


def test_composed_scaled_plain_and_base_requests_in_one_batch_match_peft(server: LiveServer, peft) -> None:
    peft_model, _ = peft
    tokenizer = server.engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # (model, adapters, the PEFT adapter that is the reference: None for the base)
    plans = [
        (server.model, COMPOSED, _peft_name(COMPOSED)),
        (server.model, SCALED, _peft_name(SCALED)),
        (server.model, NEGATIVE, _peft_name(NEGATIVE)),
        ("r8-all", None, "r8-all"),
        (server.model, None, None),
    ]
    keys = [(p, i) for p in range(len(plans)) for i in range(len(prompts))]
    expected = {(p, i): token_texts(tokenizer, peft_greedy(peft_model, plans[p][2], prompts[i], NEW_TOKENS)) for p, i in keys}

    async def one(client: openai.AsyncOpenAI, p: int, i: int) -> tuple[str, list[str]]:
        model, adapters, _ = plans[p]
        extra: dict = {"ignore_eos": True} | ({"adapters": adapters} if adapters else {})
        resp = await client.completions.create(
            model=model, prompt=prompts[i], max_tokens=NEW_TOKENS, temperature=0, logprobs=0, extra_body=extra
        )
        return resp.model, resp.choices[0].logprobs.tokens

    async def run_all() -> list[tuple[str, list[str]]]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, i) for p, i in keys))

    got = asyncio.run(run_all())
    assert {key: tokens for key, (_, tokens) in zip(keys, got)} == expected
    assert [model for model, _ in got] == [plans[p][0] for p, _ in keys]  # the request's model, echoed
    # A composition is neither of its parts, nor the base: the references tell them apart.
    for i in range(len(prompts)):
        composed = expected[(0, i)]
        assert any(composed != token_texts(tokenizer, peft_greedy(peft_model, n, prompts[i], NEW_TOKENS)) for n in COMPOSED)
    assert len({tuple(v) for v in expected.values()}) > 2 * len(prompts)


def test_chat_takes_the_field_and_streams(server: LiveServer) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Hi"}]
    common = dict(model=server.model, messages=messages, max_tokens=4, temperature=0, extra_body={"adapters": SCALED, "ignore_eos": True})
    whole = client.chat.completions.create(**common)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, **common))  # type: ignore[call-overload]
    assert whole.model == server.model and {c.model for c in chunks} == {server.model}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


BAD = "invalid_request_error"
# (id, body changes, status, param, code); every one is refused before it runs anything.
BAD_INPUTS = [
    ("unknown-name", {"adapters": {"no-such-adapter": 0.5}}, 404, "adapters", "model_not_found"),
    ("one-unknown-of-two", {"adapters": {"r4-attn": 0.5, "nope": 1.0}}, 404, "adapters", "model_not_found"),
    ("base-id-as-adapter", {"adapters": {"tiny": 0.5}}, 404, "adapters", "model_not_found"),
    ("nine-entries", {"adapters": {f"a{i}": 0.1 for i in range(9)}}, 400, "adapters", None),
    ("empty-object", {"adapters": {}}, 400, "adapters", None),
    ("nan-weight", {"adapters": {"r4-attn": float("nan")}}, 400, "adapters.r4-attn", None),
    ("inf-weight", {"adapters": {"r4-attn": float("inf")}}, 400, "adapters.r4-attn", None),
    ("string-weight", {"adapters": {"r4-attn": "0.5"}}, 400, "adapters.r4-attn", None),
    ("bool-weight", {"adapters": {"r4-attn": True}}, 400, "adapters.r4-attn", None),
    ("null-weight", {"adapters": {"r4-attn": None}}, 400, "adapters.r4-attn", None),
    ("list", {"adapters": ["r4-attn"]}, 400, "adapters", None),
    ("string", {"adapters": "r4-attn"}, 400, "adapters", None),
    ("weight-that-overflows", {"adapters": {"r4-attn": 1e30}}, 400, "adapters", None),
    ("two-weights-that-overflow", {"adapters": {"r4-attn": 3e37, "r8-all": -3e37}}, 400, "adapters", None),
    ("model-is-an-adapter", {"model": "r8-all", "adapters": {"r4-attn": 0.5}}, 400, "adapters", None),
    ("model-is-unknown", {"model": "gpt-4", "adapters": {"r4-attn": 0.5}}, 400, "adapters", None),
    ("more-than-max-loras", {"adapters": {"r4-attn": 0.5, "r8-all": 0.5, "r2-mlp": 0.5}}, 400, "adapters", None),
]


@pytest.mark.parametrize(("changes", "status", "param", "code"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_adapters_get_a_clear_4xx_and_change_nothing(server: LiveServer, route: str, changes: dict, status, param, code) -> None:
    body: dict = {"model": server.model, "max_tokens": 2}
    body |= {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    body |= changes
    # json.dumps writes NaN and Infinity as bare tokens, as a careless client would; httpx's json= refuses them.
    resp = httpx.post(server.base_url + route, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (BAD, param, code)
    assert error["message"]
    catalog = server.engine.adapters
    assert all(catalog.num_refs(n) == 0 for n in TINY_ADAPTERS)
    assert server.engine.num_running() == 0 and server.engine.num_waiting() == 0


def test_one_adapter_at_weight_one_is_the_adapter_and_compositions_share_one_metrics_label(server: LiveServer) -> None:
    def complete(**fields) -> dict:
        body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logprobs": 0} | fields
        resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def finished(adapter: str) -> float:
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        assert "r4-attn*" not in metrics  # no series per composition: weights are any float
        line = f'lora_serve_requests_total{{adapter="{adapter}",finish_reason="length"}} '
        return next((float(x.removeprefix(line)) for x in metrics.splitlines() if x.startswith(line)), 0.0)

    before = finished("+composed"), finished("r4-attn")
    plain = complete(model="r4-attn")
    named = complete(model=server.model, adapters={"r4-attn": 1.0})
    assert named["choices"][0]["logprobs"] == plain["choices"][0]["logprobs"]
    assert named["model"] == server.model
    complete(model=server.model, adapters={"r4-attn": 0.25})
    complete(model=server.model, adapters={"r4-attn": 0.5, "r2-mlp": 2.0})
    assert (finished("+composed"), finished("r4-attn")) == (before[0] + 2, before[1] + 2)
