"""Chat completions through the official openai client against a live server on the tiny model."""

from __future__ import annotations

import httpx
import pytest

from tests.api.live_server import LiveServer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_non_stream_has_text_usage_and_finish_reason(server: LiveServer) -> None:
    resp = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == server.model
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_max_tokens_reached_gives_length(server: LiveServer) -> None:
    resp = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_stream_matches_non_stream_and_reports_usage(server: LiveServer) -> None:
    client = server.client()
    kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_stream_without_include_usage_has_no_usage_chunk(server: LiveServer) -> None:
    chunks = list(server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(server: LiveServer) -> None:
    """vLLM's extension, which load testers (guidellm) send: each chunk counts the tokens streamed until then."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(server.client().chat.completions.create(**kwargs, stream=True, stream_options=options))
    assert all(c.usage is not None for c in chunks)
    tokens = [c.usage.completion_tokens for c in chunks]
    assert tokens == sorted(tokens) and tokens[0] == 0 and tokens[-1] == 6
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}
    assert chunks[-1].choices == []  # and the usage chunk still ends the stream


def test_same_seed_same_text_different_seeds_differ(server: LiveServer) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        resp = client.chat.completions.create(
            model=server.model,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return resp.choices[0].message.content

    assert sample(1234) == sample(1234)
    # Random weights give a near-flat distribution: 16 tokens from different seeds all agreeing is ~impossible.
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_logprobs_shape(server: LiveServer, top_logprobs: int) -> None:
    resp = server.client().chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=top_logprobs,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == top_logprobs
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        if top_logprobs:
            # Greedy: the sampled token is the most likely one.
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    assert "".join(e.token for e in content) == resp.choices[0].message.content


def test_content_parts_equal_plain_string(server: LiveServer) -> None:
    client = server.client()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello there"}]
    a = client.chat.completions.create(model=server.model, messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=server.model, messages=plain, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_null_fields_mean_defaults(server: LiveServer) -> None:
    nulls = dict.fromkeys(
        [
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "logprobs",
            "top_logprobs",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "repetition_penalty",
            "min_p",
            "min_tokens",
            "user",
            "max_completion_tokens",
            "tools",
            "tool_choice",
            "response_format",
        ]
    )
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 3, **nulls}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["logprobs"] is None
