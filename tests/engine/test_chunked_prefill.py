"""Chunked prefill: prompts prefilled over several steps give exactly the tokens of whole-prompt prefill
(greedy, seeded sampling, under preemption, with adapters, merged), and a long prompt never keeps
the running streams from their next token."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.model.arch import ModelArch

from .helpers import run_to_completion

LENGTHS = [5, 23, 64, 130, 17, 200]  # several longer than the chunked engines' budgets
WHOLE = dict(max_num_batched_tokens=2048)
CHUNKED = {
    "budget 64": dict(max_num_batched_tokens=64),
    "budget 64, chunks of 13": dict(max_num_batched_tokens=64, long_prefill_token_threshold=13),
    "budget 16, chunks of 1": dict(max_num_batched_tokens=16, long_prefill_token_threshold=1),
}


def engine(path: Path, kv_gb: float = 0.05, lora: LoRAConfig | None = None, **sched) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=kv_gb, block_size=8),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256, **sched),
        lora=lora or LoRAConfig(),
    )
    return LLMEngine.from_config(config, path)


def requests(params: SamplingParams) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"p{i}": ([(13 * i + 7 * j) % 4000 + 30 for j in range(n)], params) for i, n in enumerate(LENGTHS)}


def tokens(results: dict[str, dict]) -> dict[str, list[int]]:
    return {rid: r["tokens"] for rid, r in results.items()}


GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.mark.parametrize("chunked", CHUNKED.values(), ids=CHUNKED.keys())
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chunked_gives_the_tokens_of_whole_prefill(tiny_llama_dir: Path, chunked: dict, params: SamplingParams):
    whole = run_to_completion(engine(tiny_llama_dir, **WHOLE), requests(params))
    parts = run_to_completion(engine(tiny_llama_dir, **chunked), requests(params))
    assert tokens(parts) == tokens(whole)
    if params.logprobs:
        for rid in whole:
            got = [lp.logprob for lp in parts[rid]["logprobs"]]
            assert got == pytest.approx([lp.logprob for lp in whole[rid]["logprobs"]], abs=1e-4)


def test_chunked_under_preemption(tiny_llama_dir: Path):
    whole = run_to_completion(engine(tiny_llama_dir, **WHOLE), requests(GREEDY))
    # 256 usable tokens of cache for 559 tokens of prompts and outputs: sequences wait, and are preempted
    # mid-prefill.
    tight = engine(tiny_llama_dir, kv_gb=264 * 512 / 2**30, max_num_batched_tokens=32, long_prefill_token_threshold=24)
    assert tight.kv_cache.num_usable_blocks * 8 == 256 < sum(LENGTHS) + 20 * len(LENGTHS)
    assert tokens(run_to_completion(tight, requests(GREEDY))) == tokens(whole)
    assert tight.scheduler.num_preemptions > 0 and tight.kv_cache.usage == 0.0


def test_prompt_logprobs_under_preemption_are_those_of_whole_prefill(tiny_llama_dir: Path):
    """Each prompt position's logprob is recorded once, in the chunk that runs it, and not again when a
    preempted sequence recomputes its prefix; it is sent once, with the first token."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    whole = run_to_completion(engine(tiny_llama_dir, **WHOLE), requests(params))
    tight = engine(tiny_llama_dir, kv_gb=264 * 512 / 2**30, max_num_batched_tokens=32, long_prefill_token_threshold=24)
    parts = run_to_completion(tight, requests(params))
    assert tight.scheduler.num_preemptions > 0
    for rid, n in zip(whole, LENGTHS):
        ((want,), (got,)) = whole[rid]["prompt_logprobs"], parts[rid]["prompt_logprobs"]
        assert len(got) == len(want) == n and got[0] is None
        assert [lp.token_id for lp in got[1:]] == [lp.token_id for lp in want[1:]]
        assert [lp.logprob for lp in got[1:]] == pytest.approx([lp.logprob for lp in want[1:]], abs=1e-4)
        assert [t for lp in got[1:] for t, _ in lp.top] == [t for lp in want[1:] for t, _ in lp.top]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    arch = ModelArch.from_dir(tiny_llama_dir)
    out = tmp_path_factory.mktemp("chunked-adapters")
    return [f"a{i}={write_random_adapter(out / f'a{i}', arch, rank=4 + 4 * i, seed=i, alpha=64.0)}" for i in range(3)]


@pytest.mark.parametrize("merged", [None, "a1"])
def test_chunked_with_adapters_and_merged(tiny_llama_dir: Path, adapters: list[str], merged: str | None):
    """Adapter rows and base rows, prefill chunks and decodes, in the same segmented LoRA batches."""
    names = [None, "a0", "a1", "a2", "a1", None]
    lora = {f"p{i}": n for i, n in enumerate(names)}
    config = LoRAConfig(max_loras=2, max_lora_rank=16, lora_modules=adapters, merge=merged)
    whole = run_to_completion(engine(tiny_llama_dir, lora=config, **WHOLE), requests(GREEDY), lora)
    chunked = engine(tiny_llama_dir, lora=config, max_num_batched_tokens=48, long_prefill_token_threshold=20)
    assert tokens(run_to_completion(chunked, requests(GREEDY), lora)) == tokens(whole)
    assert len({tuple(t) for t in tokens(whole).values()}) == len(LENGTHS)  # every row its own answer


def test_a_long_prompt_never_stalls_running_streams(tiny_llama_dir: Path):
    e = engine(tiny_llama_dir, max_num_batched_tokens=32, long_prefill_token_threshold=16)
    for i in range(4):
        e.add_request(f"s{i}", [40 + i] * 6, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    while len(e.scheduler.running) < 4 or any(s.num_new_tokens > 1 for s in e.scheduler.running):
        e.step()
    e.add_request("long", list(range(100, 300)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    steps = 0
    while not any(s.request_id == "long" and s.output_token_ids for s in e._seqs.values()):
        out = {o.request_id for o in e.step()}
        assert {"s0", "s1", "s2", "s3"} <= out  # every stream got its token in this step
        steps += 1
    assert steps == -(-200 // 16)  # 16 prompt tokens a step
