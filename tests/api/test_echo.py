"""echo on /v1/completions, with the prompt's logprobs (lm-evaluation-harness's loglikelihood call:
echo, max_tokens 1, logprobs 1, temperature 0, a prompt list), and vLLM's prompt_logprobs extension.
The prompt tokens' logprobs must be transformers' log_softmax over the same prompt on the same weights
(PEFT's for an adapter), here with prompts prefilled in chunks of 16 tokens beside other requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import MAX_RANK, make_tiny_adapters
from tests.api.live_server import LiveServer, live_server

ATOL = 1e-4
ADAPTER = "r8-all"
PROMPTS = [
    "Question: what colour is the sky on a clear summer day, seen from a field?\nAnswer: blue",
    "The train left the station at noon and reached the coast two hours later, tired.",
]


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, peft, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256, max_num_batched_tokens=16),  # prompts in chunks
        lora=LoRAConfig(
            adapter_dir=tmp_path_factory.mktemp("store"),
            max_lora_rank=MAX_RANK,
            lora_dtype="float32",  # float16 slots (the CPU kernels') would round the adapter
            lora_modules=[f"{name}={path}" for name, path in peft[1].items()],
        ),
    )
    engine = AsyncEngine.from_config(config)
    try:
        with live_server(engine, ServerConfig(served_model_name="tiny")) as server:
            yield server
    finally:
        engine.shutdown()


def reference(peft_model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the log_softmax after ids[: p + 1], float32."""
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
        else:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _loglikelihood(live: LiveServer, model: str, prompt, **kwargs):
    args = dict(echo=True, max_tokens=1, logprobs=1, temperature=0) | kwargs
    return live.client().completions.create(model=model, prompt=prompt, **args)


@pytest.mark.parametrize("model", ["tiny", ADAPTER])
def test_lm_eval_loglikelihood_call_matches_transformers(live: LiveServer, peft, model: str) -> None:
    resp = _loglikelihood(live, model, PROMPTS)
    assert len(resp.choices) == len(PROMPTS)
    token_text = live.engine.tokenizer.decode
    for choice, text in zip(resp.choices, PROMPTS):
        ids = live.engine.tokenizer.encode(text)
        assert len(ids) > 16  # prefilled in more than one chunk
        ref = reference(peft[0], None if model == "tiny" else model, ids)
        lps = choice.logprobs
        assert choice.text.startswith(text) and len(lps.tokens) == len(ids) + 1
        assert lps.tokens[: len(ids)] == [token_text([t]) for t in ids]
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        got = torch.tensor(lps.token_logprobs[1:])  # the prompt's tokens after the first, then the generated one
        want = ref[torch.arange(len(ids)), torch.tensor([*ids[1:], int(ref[-1].argmax())])]
        assert got == pytest.approx(want, abs=ATOL)
        for p, top in enumerate(lps.top_logprobs[1:]):
            assert len(top) == 1 and next(iter(top.values())) == pytest.approx(ref[p].max().item(), abs=ATOL)
        assert lps.text_offset[0] == 0 and lps.text_offset[1] == len(lps.tokens[0])


def test_the_adapter_changes_the_prompt_logprobs(live: LiveServer) -> None:
    base, lora = (_loglikelihood(live, m, PROMPTS[0]).choices[0].logprobs.token_logprobs for m in ("tiny", ADAPTER))
    assert max(abs(a - b) for a, b in zip(base[1:], lora[1:])) > 1e-3


def test_max_tokens_0_gives_the_prompt_alone(live: LiveServer) -> None:
    resp = _loglikelihood(live, "tiny", PROMPTS, max_tokens=0)
    for choice, text in zip(resp.choices, PROMPTS):
        assert choice.text == text and choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == len(live.engine.tokenizer.encode(text))
    assert resp.usage.completion_tokens == 0
    assert resp.usage.prompt_tokens == sum(len(live.engine.tokenizer.encode(t)) for t in PROMPTS)


def test_echo_without_logprobs_and_of_token_ids(live: LiveServer) -> None:
    client = live.client()
    ids = live.engine.tokenizer.encode(PROMPTS[1])
    plain = client.completions.create(model="tiny", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=4, temperature=0, echo=True)
    assert [c.text for c in echoed.choices] == [p + c.text for p, c in zip(PROMPTS, plain.choices)]
    assert echoed.choices[0].logprobs is None
    of_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert of_ids.choices[0].text == live.engine.tokenizer.decode(ids) + plain.choices[1].text


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_a_stream_sends_each_prompt_first(live: LiveServer, max_tokens: int) -> None:
    whole = _loglikelihood(live, ADAPTER, PROMPTS, n=2, max_tokens=max_tokens)
    chunks = list(_loglikelihood(live, ADAPTER, PROMPTS, n=2, max_tokens=max_tokens, stream=True))
    firsts: dict[int, object] = {}
    texts: dict[int, str] = {}
    token_logprobs: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
            texts[c.index] = texts.get(c.index, "") + c.text
            token_logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
    for index, choice in enumerate(whole.choices):
        prompt = PROMPTS[index // 2]
        assert firsts[index].text.startswith(prompt)  # type: ignore[attr-defined]
        assert len(firsts[index].logprobs.tokens) >= len(live.engine.tokenizer.encode(prompt))  # type: ignore[attr-defined]
        assert texts[index] == choice.text
        assert token_logprobs[index] == choice.logprobs.token_logprobs


def _rank_bounds(row: torch.Tensor, value: float) -> tuple[int, int]:
    """The ranks a token of this logprob may have, allowing for float noise between ties."""
    return int((row > value + ATOL).sum()) + 1, int((row > value - ATOL).sum()) + 1


def _check_vllm_prompt_logprobs(got: list, ids: list[int], ref: torch.Tensor, num_top: int, decode) -> None:
    assert got[0] is None and len(got) == len(ids)
    for p, entry in enumerate(got[1:]):
        token = ids[p + 1]
        actual = entry[str(token)]  # JSON keys: token ids as strings, as vLLM's
        assert actual["logprob"] == pytest.approx(ref[p, token].item(), abs=ATOL)
        low, high = _rank_bounds(ref[p], ref[p, token].item())
        assert low <= actual["rank"] <= high and actual["decoded_token"] == decode([token])
        best = sorted((v["logprob"] for v in entry.values()), reverse=True)[:num_top]  # the top ones, and the prompt's token
        assert best == pytest.approx(torch.topk(ref[p], num_top).values.tolist(), abs=ATOL)


def test_vllm_prompt_logprobs_on_completions_and_chat(live: LiveServer, peft) -> None:
    client, tokenizer = live.client(), live.engine.tokenizer
    resp = client.completions.create(model=ADAPTER, prompt=PROMPTS, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    for choice, text in zip(resp.choices, PROMPTS):
        ids = tokenizer.encode(text)
        _check_vllm_prompt_logprobs(choice.model_extra["prompt_logprobs"], ids, reference(peft[0], ADAPTER, ids), 2, tokenizer.decode)
        assert not choice.text.startswith(text)  # no echo
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, n=2, extra_body={"prompt_logprobs": 1})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.usage.prompt_tokens == len(ids)
    _check_vllm_prompt_logprobs(chat.model_extra["prompt_logprobs"], ids, reference(peft[0], None, ids), 1, tokenizer.decode)
