"""penalties, logit_bias, min_p and min_tokens through the openai client, in mixed-adapter batches.

The tiny random model's logits are small (std about 0.16): a bias of 2 makes greedy repeat a token
until a penalty stops it, a bias of 100 or a penalty of 2 decides every token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.adapter_helpers import modules_server
from tests.api.live_server import LiveServer

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
EOS = 2  # the tiny model's
FAVOURED = 1234


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, peft_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with modules_server(tiny_llama_dir, peft_paths, tmp_path_factory.mktemp("store")) as server:
        yield server


def _tokens(live: LiveServer, model: str, max_tokens: int = 24, extra_body: dict | None = None, **fields) -> list[str]:
    """The output's tokens (greedy unless fields say otherwise; EOS ignored)."""
    resp = live.client().chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        logprobs=True,
        extra_body={"ignore_eos": True, **(extra_body or {})},
        **{"temperature": 0, **fields},
    )
    return [t.token for t in resp.choices[0].logprobs.content]


@pytest.mark.parametrize("model", ["tiny", "r8-all"])
@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_a_large_penalty_ends_the_repeats(live: LiveServer, model: str, penalty: str) -> None:
    favoured = {str(FAVOURED): 2}
    repeated = _tokens(live, model, logit_bias=favoured)
    assert len(set(repeated)) == 1, "without the penalty the favoured token repeats"
    penalised = _tokens(live, model, logit_bias=favoured, **{penalty: 2.0})
    assert len(set(penalised)) == len(penalised) == 24
    assert penalised[0] == repeated[0]


def test_a_negative_frequency_penalty_repeats(live: LiveServer) -> None:
    plain = _tokens(live, "tiny")
    assert len(set(plain)) > 1
    assert len(set(_tokens(live, "tiny", frequency_penalty=-2.0))) == 1


def test_logit_bias_100_forces_a_token_and_logprobs_stay_the_models(live: LiveServer) -> None:
    text = live.engine.tokenizer.decode([FAVOURED])
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 7, "extra_body": {"ignore_eos": True}}):
        resp = live.client().chat.completions.create(
            model="r4-attn", messages=MESSAGES, max_tokens=6, logprobs=True, logit_bias={str(FAVOURED): 100}, **kwargs
        )
        content = resp.choices[0].logprobs.content
        assert [t.token for t in content] == [text] * 6
        assert all(t.logprob < -5 for t in content)  # the raw model's (near uniform over 49152), not the biased ~0


def test_logit_bias_minus_100_bans_the_greedy_token(live: LiveServer) -> None:
    plain = _tokens(live, "r2-mlp", max_tokens=1)[0]
    banned = live.engine.tokenizer.convert_tokens_to_ids(live.engine.tokenizer.tokenize(plain))[0]
    assert _tokens(live, "r2-mlp", max_tokens=1, logit_bias={str(banned): -100})[0] != plain


@pytest.mark.parametrize("min_tokens", [0, 5])
def test_min_tokens_holds_off_eos(live: LiveServer, min_tokens: int) -> None:
    """EOS biased to be certain: it ends the output at the first token min_tokens allows."""
    kwargs = dict(model="r4-attn", max_tokens=20, temperature=0, logit_bias={str(EOS): 100}, extra_body={"min_tokens": min_tokens})
    chat = live.client().chat.completions.create(messages=MESSAGES, **kwargs)
    text = live.client().completions.create(prompt="Once upon a time", **kwargs)
    for resp in (chat, text):
        assert (resp.usage.completion_tokens, resp.choices[0].finish_reason) == (min_tokens + 1, "stop")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_min_p_one_is_greedy(live: LiveServer, seed: int) -> None:
    drawn = _tokens(live, "r8-all", temperature=1.0, seed=seed, extra_body={"min_p": 1.0})
    assert drawn == _tokens(live, "r8-all")


def test_repetition_penalty_ends_the_repeats(live: LiveServer) -> None:
    favoured = {str(FAVOURED): 1}
    assert len(set(_tokens(live, "r4-attn", logit_bias=favoured))) == 1
    penalised = _tokens(live, "r4-attn", logit_bias=favoured, extra_body={"repetition_penalty": 3.0})
    assert len(set(penalised)) > 1


# (model, fields): greedy and seeded rows, each field on its own row, on the base and all three adapters.
MIXED = [
    ("tiny", {"temperature": 0}),
    ("r4-attn", {"temperature": 0, "frequency_penalty": 2.0, "logit_bias": {str(FAVOURED): 2}}),
    ("r8-all", {"temperature": 1.0, "seed": 11, "logit_bias": {"1234": 5}, "extra_body": {"min_p": 0.05}}),
    ("r2-mlp", {"temperature": 0, "extra_body": {"repetition_penalty": 0.5, "min_tokens": 8}}),
    ("tiny", {"temperature": 0.8, "seed": 12, "presence_penalty": 1.0, "top_p": 0.9}),
    ("r4-attn", {"temperature": 1.0, "seed": 13}),
]


def test_a_mixed_adapter_batch_gives_every_request_what_it_gets_alone(live: LiveServer) -> None:
    def kwargs(model: str, fields: dict) -> dict:
        extra = {"ignore_eos": True, **fields.get("extra_body", {})}
        return dict(model=model, messages=MESSAGES, max_tokens=24, **{**fields, "extra_body": extra})

    async def together() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(**kwargs(m, f)) for m, f in MIXED))
        return [r.choices[0].message.content for r in replies]

    batched = asyncio.run(together())
    alone = [live.client().chat.completions.create(**kwargs(m, f)).choices[0].message.content for m, f in MIXED]
    assert batched == alone
    plain = [live.client().chat.completions.create(**kwargs(m, {"temperature": 0})).choices[0].message.content for m, _ in MIXED[1:4]]
    assert all(a != p for a, p in zip(alone[1:4], plain)), "each field changed its request's output"
