"""n > 1 and prompt lists: one request fans out into prompts x n choices that run together. Choice
index prompt_index * n + j; a seeded choice j is the n=1 request seeded seed + j; usage counts each
prompt once and every choice's tokens; streams name each choice's index."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_serve.engine.sampling_params import SEED_MAX, SEED_MIN
from tests.api.adapter_helpers import modules_server
from tests.api.live_server import LiveServer

HI = [{"role": "user", "content": "Say something."}]
TOKENS = 6
SAMPLED = dict(max_tokens=TOKENS, temperature=1.0, extra_body={"ignore_eos": True})
GREEDY = dict(max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True})


def _chat(server: LiveServer, **kwargs):
    return server.client().chat.completions.create(model=kwargs.pop("model", server.model), messages=HI, **kwargs)


def _complete(server: LiveServer, prompt, **kwargs):
    return server.client().completions.create(model=kwargs.pop("model", server.model), prompt=prompt, **kwargs)


def _streamed(stream) -> tuple[dict[int, str], dict[int, list], list]:
    """Per choice index: the text and the chunks' finish reasons; and the usage chunks."""
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list] = defaultdict(list)
    usages = []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if hasattr(c, "delta") else c.text
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    return dict(texts), dict(finishes), usages


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_n_seeded_choices_are_the_n1_requests_seeded_seed_plus_j(server: LiveServer, route: str) -> None:
    def ask(**kw):
        return _chat(server, **SAMPLED, **kw) if route == "chat" else _complete(server, "Once upon a time", **SAMPLED, **kw)

    def text(choice) -> str:
        return choice.message.content if route == "chat" else choice.text

    resp = ask(n=3, seed=42)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [text(c) for c in resp.choices]
    assert len(set(texts)) == 3  # the choices differ
    assert [text(c) for c in ask(n=3, seed=42).choices] == texts  # and come back the same
    singles = [ask(n=1, seed=42 + j) for j in range(3)]
    assert [text(s.choices[0]) for s in singles] == texts
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt once, not n times
    assert resp.usage.completion_tokens == 3 * TOKENS


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_n_streamed_names_each_choice_and_gives_usage_once(server: LiveServer, route: str) -> None:
    kw = dict(**SAMPLED, n=3, seed=7)
    if route == "chat":
        whole = [c.message.content for c in _chat(server, **kw).choices]
        stream = _chat(server, **kw, stream=True, stream_options={"include_usage": True})
    else:
        whole = [c.text for c in _complete(server, "Hello", **kw).choices]
        stream = _complete(server, "Hello", **kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts, finishes, usages = _streamed(chunks)
    assert [texts[i] for i in range(3)] == whole
    assert finishes == {i: ["length"] for i in range(3)}  # one finish chunk per choice
    assert len(usages) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    assert usages[0].completion_tokens == 3 * TOKENS
    if route == "chat":  # each choice's first chunk gives its role
        roles = [c.index for chunk in chunks for c in chunk.choices if c.delta.role == "assistant"]
        assert sorted(roles) == [0, 1, 2]


def test_seeds_wrap_into_the_64_bit_range(server: LiveServer) -> None:
    resp = _complete(server, "Hi", **SAMPLED, n=2, seed=SEED_MAX)
    assert resp.choices[1].text == _complete(server, "Hi", **SAMPLED, seed=SEED_MIN).choices[0].text


PROMPTS = ["The sky is", "Water boils at", "My favourite food"]


@pytest.mark.parametrize("as_ids", [False, True], ids=["texts", "token-id-lists"])
def test_a_prompt_list_gives_n_choices_per_prompt_in_order(server: LiveServer, as_ids: bool) -> None:
    tokenizer = server.engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS] if as_ids else PROMPTS
    resp = _complete(server, prompts, **GREEDY, n=2)
    assert [c.index for c in resp.choices] == list(range(6))
    singles = [_complete(server, p, **GREEDY) for p in prompts]
    assert [c.text for c in resp.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert resp.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert resp.usage.completion_tokens == 6 * TOKENS


def test_a_streamed_prompt_list_matches_the_whole_one(server: LiveServer) -> None:
    whole = _complete(server, PROMPTS, **GREEDY)
    texts, finishes, _ = _streamed(_complete(server, PROMPTS, **GREEDY, stream=True))
    assert texts == {c.index: c.text for c in whole.choices}
    assert set(finishes) == {0, 1, 2}


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, peft_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with modules_server(tiny_llama_dir, peft_paths, tmp_path_factory.mktemp("store")) as server:
        yield server


def test_n_on_an_adapter_and_the_base_at_once(live: LiveServer) -> None:
    models = ["tiny", "r4-attn", "r8-all"]
    alone = {m: _complete(live, PROMPTS[0], model=m, **GREEDY).choices[0].text for m in models}
    assert len(set(alone.values())) == 3, "the adapters must change the answer, or this test checks nothing"
    with ThreadPoolExecutor(len(models)) as pool:
        together = dict(zip(models, pool.map(lambda m: _complete(live, [PROMPTS[0], PROMPTS[1]], model=m, n=2, **GREEDY), models)))
    for m in models:
        texts = [c.text for c in together[m].choices]
        assert texts[:2] == [alone[m]] * 2  # greedy: every choice of prompt 0 is the lone answer
        assert texts[2] == texts[3] != texts[0]
