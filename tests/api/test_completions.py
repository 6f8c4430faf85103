"""Legacy completions: text, single-item list and token-id prompts; streaming; logprobs arrays."""

from __future__ import annotations

import pytest

from tests.api.conftest import TINY_MAX_MODEL_LEN
from tests.api.live_server import LiveServer

PROMPT = "The quick brown fox"


def test_non_stream(server: LiveServer) -> None:
    resp = server.client().completions.create(
        model=server.model, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


def test_prompt_forms_agree(server: LiveServer) -> None:
    client = server.client()
    token_ids = server.engine.tokenizer.encode(PROMPT)
    texts = {
        client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0).choices[0].text
        for prompt in (PROMPT, [PROMPT], token_ids)
    }
    assert len(texts) == 1


def test_without_max_tokens_generation_fills_the_context(server: LiveServer) -> None:
    resp = server.client().completions.create(model=server.model, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == TINY_MAX_MODEL_LEN


def test_stream_with_usage(server: LiveServer) -> None:
    client = server.client()
    kwargs = dict(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("num_top", [0, 2])
def test_logprobs_arrays(server: LiveServer, stream: bool, num_top: int) -> None:
    kwargs = dict(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=num_top, extra_body={"ignore_eos": True})
    client = server.client()
    if stream:
        chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
        text = "".join(c.choices[0].text for c in chunks)
        tokens, token_logprobs, top, offsets = [], [], [], []
        for c in chunks:
            lp = c.choices[0].logprobs
            tokens += lp.tokens
            token_logprobs += lp.token_logprobs
            top += lp.top_logprobs
            offsets += lp.text_offset
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text = choice.text
        lp = choice.logprobs
        tokens, token_logprobs, top, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    assert len(tokens) == len(token_logprobs) == len(top) == len(offsets) == 6
    assert all(x <= 0 for x in token_logprobs)
    assert all(len(t) == num_top for t in top)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert "".join(tokens) == text
