"""The client libraries people point at OpenAI-compatible servers, unmodified, against a live server:
LangChain's ChatOpenAI and OpenAI (completions) and LiteLLM, on the base and on adapters (named in `model`,
as with vLLM). Each library's answer must be the one the official `openai` client gets for the same request
(greedy). The completions clients send a batch as one request with a list of prompts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.adapter_helpers import modules_server
from tests.api.live_server import LiveServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list at import

langchain_openai = pytest.importorskip("langchain_openai")
litellm = pytest.importorskip("litellm")

QUESTION = "Name three colours."
MODELS = ["tiny", "r4-attn", "r8-all"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, peft_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with modules_server(tiny_llama_dir, peft_paths, tmp_path_factory.mktemp("store")) as server:
        yield server


@pytest.fixture(scope="module")
def expected(live: LiveServer) -> dict[str, str]:
    """What the openai client gets, per model: the reference every library must reproduce."""
    client = live.client()
    out = {}
    for model in MODELS:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=MAX_TOKENS
        )
        out[model] = resp.choices[0].message.content
    assert len(set(out.values())) == len(MODELS), "the adapters must change the answer, or this test checks nothing"
    return out


def _chat(live: LiveServer, model: str):
    return langchain_openai.ChatOpenAI(
        base_url=f"{live.base_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=MAX_TOKENS, max_retries=0
    )


@pytest.mark.parametrize("model", MODELS)
def test_langchain_invoke_and_stream(live: LiveServer, expected: dict[str, str], model: str) -> None:
    chat = _chat(live, model)
    assert chat.invoke(QUESTION).content == expected[model]
    chunks = list(chat.stream(QUESTION))
    assert len(chunks) > 1 and "".join(str(c.content) for c in chunks) == expected[model]


def test_langchain_batch_over_base_and_adapters_runs_each_as_alone(live: LiveServer, expected: dict[str, str]) -> None:
    from langchain_core.runnables import RunnableLambda

    # One runnable per model, batched concurrently: the server mixes them into shared steps.
    route = RunnableLambda(lambda model: _chat(live, model).invoke(QUESTION).content)
    assert route.batch(MODELS * 2, config={"max_concurrency": 6}) == [expected[m] for m in MODELS * 2]


@pytest.mark.parametrize("model", MODELS)
def test_litellm_completion_and_stream(live: LiveServer, expected: dict[str, str], model: str) -> None:
    args = dict(
        model=f"openai/{model}",  # litellm's route for any OpenAI-compatible server
        api_base=f"{live.base_url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    resp = litellm.completion(**args)
    assert resp.choices[0].message.content == expected[model]
    assert resp.usage.completion_tokens == MAX_TOKENS or resp.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**args, stream=True))
    assert streamed == expected[model]


def test_litellm_reports_a_missing_adapter_as_not_found(live: LiveServer) -> None:
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(
            model="openai/no-such-adapter", api_base=f"{live.base_url}/v1", api_key="unused",
            messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        )  # fmt: skip


PROMPTS = ["The sky is", "Water boils at", "My favourite food is"]


def _alone(live: LiveServer, model: str) -> list[str]:
    """What the openai client gets for each of PROMPTS sent alone."""
    client = live.client()
    return [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=MAX_TOKENS).choices[0].text for p in PROMPTS]


@pytest.mark.parametrize("model", ["tiny", "r8-all"])
def test_langchain_completions_batch_is_one_prompt_list(live: LiveServer, model: str) -> None:
    llm = langchain_openai.OpenAI(
        base_url=f"{live.base_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=MAX_TOKENS, max_retries=0
    )
    assert llm.batch(PROMPTS) == _alone(live, model)


@pytest.mark.parametrize("model", ["tiny", "r4-attn"])
def test_litellm_text_completion_of_a_prompt_list(live: LiveServer, model: str) -> None:
    resp = litellm.text_completion(
        model=f"text-completion-openai/{model}", api_base=f"{live.base_url}/v1", api_key="unused",
        prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    assert [c.text for c in resp.choices] == _alone(live, model)
