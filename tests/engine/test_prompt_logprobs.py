"""SamplingParams.prompt_logprobs on the embedded model against transformers' log_softmax over the same prompt
(and PEFT's for an adapter row), prefilled whole or in chunks, beside requests that ask for none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams

from ..lora.conftest import ATTN, MLP, make_peft_adapters
from .helpers import chat_ids, run_to_completion

pytestmark = pytest.mark.slow
ADAPTER = "r8-all"
TOP = 3
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river."
ATOL = 1e-4
BUDGETS = {"whole": dict(max_num_batched_tokens=512), "chunks of 7": dict(max_num_batched_tokens=64, long_prefill_token_threshold=7)}


@pytest.fixture(scope="module")
def peft(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(PeftModel on the embedded base holding ADAPTER, its folder)."""
    model, paths = make_peft_adapters(
        default_model_dir, tmp_path_factory.mktemp("peft"), {ADAPTER: dict(r=8, lora_alpha=16, target_modules=ATTN + MLP)}
    )
    return model, paths[ADAPTER]


@pytest.fixture(scope="module", params=list(BUDGETS), ids=list(BUDGETS))
def engine(request: pytest.FixtureRequest, default_model_dir: Path, peft) -> LLMEngine:
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=256, **BUDGETS[request.param]),
        cache=CacheConfig(kv_cache_memory_gb=0.05),
        lora=LoRAConfig(
            max_lora_rank=8, lora_dtype="float32", lora_modules=[f"{ADAPTER}={peft[1]}"]
        ),  # float16 slots (the CPU kernels') would round the adapter
    )
    return LLMEngine.from_config(config, default_model_dir)


def reference(peft_model, adapter: str | None, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is the log_softmax after prompt[: p + 1], float32, with PEFT's adapter or none."""
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=torch.tensor([prompt])).logits[0]
        else:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits[:-1].float(), dim=-1)


def check(got: list, prompt: list[int], ref: torch.Tensor) -> None:
    assert got[0] is None and len(got) == len(prompt)
    for p, lp in enumerate(got[1:]):
        assert lp.token_id == prompt[p + 1]
        assert lp.logprob == pytest.approx(ref[p, prompt[p + 1]].item(), abs=ATOL)
        want_top = torch.topk(ref[p], TOP)
        assert [t for t, _ in lp.top] == want_top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want_top.values.tolist(), abs=ATOL)


def test_prompt_logprobs_match_transformers_and_peft_in_one_batch(engine: LLMEngine, peft) -> None:
    prompt = engine.tokenizer.encode(TEXT)
    plain = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True)
    asking = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, prompt_logprobs=TOP)
    alone = run_to_completion(engine, {"alone": (chat_ids(engine.tokenizer, "Hi"), plain)})["alone"]
    reqs = {"base": (prompt, asking), "lora": (prompt, asking), "plain": (chat_ids(engine.tokenizer, "Hi"), plain)}
    outs = run_to_completion(engine, reqs, {"lora": ADAPTER})
    assert len(prompt) > 2 * 7  # several chunks under the chunked budget
    for name, adapter in (("base", None), ("lora", ADAPTER)):
        assert len(outs[name]["prompt_logprobs"]) == 1  # sent once
        check(outs[name]["prompt_logprobs"][0], prompt, reference(peft[0], adapter, prompt))
    assert outs["base"]["prompt_logprobs"][0][5].logprob != outs["lora"]["prompt_logprobs"][0][5].logprob
    # A request beside them that asks for none gets none, and the tokens and logprobs it gets alone.
    assert outs["plain"]["prompt_logprobs"] == [] and outs["plain"]["tokens"] == alone["tokens"]
    assert [lp.logprob for lp in outs["plain"]["logprobs"]] == pytest.approx([lp.logprob for lp in alone["logprobs"]], abs=1e-5)


def test_a_one_token_prompt_has_one_null_logprob(engine: LLMEngine) -> None:
    out = run_to_completion(engine, {"r": ([504], SamplingParams(max_tokens=1, prompt_logprobs=0))})["r"]
    assert out["prompt_logprobs"] == [[None]]


def test_prompt_logprobs_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
