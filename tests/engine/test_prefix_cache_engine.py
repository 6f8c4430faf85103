"""Prefix caching on a real model (tiny random Llama): a warm run gives the tokens of a cold one (caching
off), and their logprobs within 1e-5, for the base and several adapters in one batch, and the adapters'
tokens are PEFT's; K/V is never
shared across weights, whatever the names say: an adapter re-loaded or its folder replaced under the same
name finds nothing cached, two names for the same weights share, merged mode keys by the merged adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.composition import Composition
from lora_serve.lora.errors import AdapterChangedError

from ..lora.conftest import ATTN, make_peft_adapters
from ..lora.peft_reference import check_against, reference
from .helpers import run_to_completion

BLOCK = 8
CONFIGS = {
    "r4-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "r8-all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "r8-rslora": dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True),
}
SYSTEM = [(17 * j) % 3000 + 100 for j in range(45)]  # a shared system prompt: 5 full blocks and 5 tokens
NEW_TOKENS = 6
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
SEEDED = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def peft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(PeftModel with every adapter, {name: folder})."""
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("prefix-peft"), CONFIGS, b_std=0.2)


def engine(base: Path, caching: bool = True, lora_modules: list[str] = (), merge: str | None = None, **lora) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.01, block_size=BLOCK, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256),
        lora=LoRAConfig(**{"max_loras": 4, "max_lora_rank": 16, **lora}, lora_modules=list(lora_modules), merge=merge),
    )
    return LLMEngine.from_config(config, base)


def modules(paths: dict[str, Path]) -> list[str]:
    return [f"{n}={p}" for n, p in paths.items()]


def batch(tail: int, params: SamplingParams = GREEDY) -> tuple[dict, dict]:
    """The system prompt then a question of its own, on the base and on each adapter, twice each."""
    names = [None, *CONFIGS]
    reqs, lora = {}, {}
    for i, name in enumerate(names * 2):
        rid = f"{name or 'base'}-{i}"
        reqs[rid] = (SYSTEM + [tail + 11 * i + j for j in range(4 + i)], params)
        lora[rid] = name
    return reqs, lora


def tokens(results: dict) -> dict:
    return {rid: r["tokens"] for rid, r in results.items()}


def logprob_gap(a: dict, b: dict) -> float:
    """The largest difference between two runs' logprobs of the same tokens (the same top ids asserted)."""
    gap = 0.0
    for rid in a:
        assert len(a[rid]["logprobs"]) == len(b[rid]["logprobs"]) == NEW_TOKENS
        for x, y in zip(a[rid]["logprobs"], b[rid]["logprobs"]):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            gap = max(gap, abs(x.logprob - y.logprob), *(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)))
    return gap


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_warm_gives_the_tokens_of_cold_for_base_and_adapters_in_one_batch(tiny_llama_dir: Path, peft, params):
    peft_model, paths = peft
    reqs, lora = batch(2000, params)
    cold = run_to_completion(engine(tiny_llama_dir, caching=False, lora_modules=modules(paths)), reqs, lora)
    assert all(r["cached_tokens"] == 0 for r in cold.values())

    warm_engine = engine(tiny_llama_dir, lora_modules=modules(paths))
    run_to_completion(warm_engine, *batch(2500, params))  # the system prompt, once per adapter and the base
    warm = run_to_completion(warm_engine, reqs, lora)
    assert {rid: r["cached_tokens"] for rid, r in warm.items()} == {rid: 40 for rid in reqs}  # its 5 full blocks
    assert tokens(warm) == tokens(cold)
    if params is GREEDY:
        assert logprob_gap(warm, cold) <= 1e-5  # the sampled tokens' and the top-3's, every step
        assert len({tuple(t) for t in tokens(warm).values()}) > len(CONFIGS) + 1  # the adapters change the answers
        for rid, (prompt, _) in reqs.items():
            check_against(warm[rid], *reference(peft_model, lora[rid], prompt, NEW_TOKENS))


def test_adapters_never_share_blocks_and_the_base_shares_with_the_base(tiny_llama_dir: Path, peft):
    _, paths = peft
    e = engine(tiny_llama_dir, lora_modules=modules(paths))
    prompt = SYSTEM + [5, 6, 7]
    seen = [
        run_to_completion(e, {f"r{i}": (prompt, GREEDY)}, {f"r{i}": name})[f"r{i}"]["cached_tokens"]
        for i, name in enumerate([None, *CONFIGS, None, "r8-all"])
    ]
    assert seen == [0, 0, 0, 0, 40, 40]


def test_two_names_for_the_same_weights_share(tiny_llama_dir: Path, peft):
    _, paths = peft
    e = engine(tiny_llama_dir, lora_modules=[f"one={paths['r8-all']}", f"two={paths['r8-all']}"])
    prompt = SYSTEM + [5, 6, 7]
    first = run_to_completion(e, {"a": (prompt, GREEDY)}, {"a": "one"})["a"]
    second = run_to_completion(e, {"b": (prompt, GREEDY)}, {"b": "two"})["b"]
    assert (first["cached_tokens"], second["cached_tokens"]) == (0, 40) and first["tokens"] == second["tokens"]


def test_a_composition_shares_blocks_only_with_the_same_weights_on_the_same_adapters(tiny_llama_dir: Path, peft):
    """A composed row's K/V is keyed by each component's content identity and weight: the same composition
    (another request, another name for the same weights) reuses it, and nothing else does."""
    _, paths = peft
    e = engine(tiny_llama_dir, lora_modules=[*modules(paths), f"alias={paths['r8-all']}"])
    prompt = SYSTEM + [5, 6, 7]
    plan: list[str | Composition | None] = [
        Composition.of({"r8-all": 0.7, "r4-attn": 0.5}),
        Composition.of({"r8-all": 0.5, "r4-attn": 0.7}),  # the same adapters, other weights
        Composition.of({"r8-all": 0.7, "r8-rslora": 0.5}),  # another adapter
        Composition.of({"r8-all": 0.5}),  # one adapter at a scale
        "r8-all",
        None,
        Composition.of({"alias": 0.7, "r4-attn": 0.5}),  # the first one's weights under another name
        Composition.of({"r8-all": 0.5}),
        Composition.of({"r8-all": 1.0}),  # the adapter itself
    ]
    seen = [run_to_completion(e, {f"r{i}": (prompt, GREEDY)}, {f"r{i}": lora})[f"r{i}"] for i, lora in enumerate(plan)]
    assert [r["cached_tokens"] for r in seen] == [0, 0, 0, 0, 0, 0, 40, 40, 40]
    assert seen[6]["tokens"] == seen[0]["tokens"] and seen[7]["tokens"] == seen[3]["tokens"]


def test_an_adapter_loaded_again_under_its_name_finds_nothing_cached(tiny_llama_dir: Path, peft):
    peft_model, paths = peft
    e = engine(tiny_llama_dir, lora_modules=[f"x={paths['r8-all']}"], allowed_lora_dir=[str(paths["r8-all"].parent)])
    prompt = SYSTEM + [5, 6, 7]
    run_to_completion(e, {"old": (prompt, GREEDY)}, {"old": "x"})
    e.adapters.unregister("x")
    e.adapters.register("x", paths["r8-rslora"], "load-api")  # other weights, the same name
    new = run_to_completion(e, {"new": (prompt, GREEDY)}, {"new": "x"})["new"]
    assert new["cached_tokens"] == 0
    check_against(new, *reference(peft_model, "r8-rslora", prompt, NEW_TOKENS))


def test_an_adapter_dir_folder_replaced_under_its_name_finds_nothing_cached(tiny_llama_dir: Path, peft, tmp_path: Path):
    """As another replica sharing --adapter-dir deletes and stores again an adapter of the same name."""
    peft_model, paths = peft
    shutil.copytree(paths["r4-attn"], tmp_path / "x")
    e = engine(tiny_llama_dir, adapter_dir=str(tmp_path))
    prompt = SYSTEM + [5, 6, 7]
    run_to_completion(e, {"old": (prompt, GREEDY)}, {"old": "x"})
    shutil.rmtree(tmp_path / "x")
    shutil.copytree(paths["r8-rslora"], tmp_path / "x")
    assert e.adapters.sync_with_adapter_dir("x")  # what a request naming it does first
    new = run_to_completion(e, {"new": (prompt, GREEDY)}, {"new": "x"})["new"]
    assert new["cached_tokens"] == 0
    check_against(new, *reference(peft_model, "r8-rslora", prompt, NEW_TOKENS))


def test_merged_blocks_are_keyed_by_the_merged_adapter(tiny_llama_dir: Path, peft):
    _, paths = peft
    reqs, lora = batch(2000)
    cold = run_to_completion(engine(tiny_llama_dir, caching=False, lora_modules=modules(paths), merge="r8-all"), reqs, lora)
    e = engine(tiny_llama_dir, lora_modules=modules(paths), merge="r8-all")
    run_to_completion(e, *batch(2500))
    warm = run_to_completion(e, reqs, lora)
    assert tokens(warm) == tokens(cold) and all(r["cached_tokens"] == 40 for r in warm.values())

    e.unmerge_adapter()  # the same prompts on the plain base weights: nothing computed merged is reused
    unmerged = run_to_completion(e, reqs, lora)
    # The first request on each weights computes the system prompt, the second one (same step) shares it.
    assert [r["cached_tokens"] for r in unmerged.values()] == [0] * 4 + [40] * 4
    assert tokens(unmerged) == tokens(run_to_completion(engine(tiny_llama_dir, caching=False, lora_modules=modules(paths)), reqs, lora))


def test_a_failed_step_leaves_nothing_cached(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    e = engine(tiny_llama_dir)
    run_to_completion(e, {"a": (SYSTEM, GREEDY)})
    assert e.kv_cache.pool.num_cached > 0

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(e.runner, "run", broken)
    e.add_request("b", SYSTEM + [1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError):
        e.step()
    assert e.kv_cache.pool.num_cached == 0
    e.fail_all("engine error")
    monkeypatch.undo()
    assert run_to_completion(e, {"c": (SYSTEM, GREEDY)})["c"]["cached_tokens"] == 0


def test_preempted_sequences_come_back_to_their_cached_blocks(tiny_llama_dir: Path):
    reqs = {f"p{i}": ([(13 * i + 7 * j) % 4000 + 30 for j in range(n)], GREEDY) for i, n in enumerate([60, 70, 50, 80])}
    whole = run_to_completion(engine(tiny_llama_dir, caching=False), reqs)
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=264 * 512 / 2**30, block_size=BLOCK),  # 256 tokens for 284 of prompts
        scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256, max_num_batched_tokens=64),
    )
    tight = LLMEngine.from_config(config, tiny_llama_dir)
    assert tokens(run_to_completion(tight, reqs)) == tokens(whole)
    assert tight.scheduler.num_preemptions > 0 and tight.kv_cache.num_prefix_hits > 0


def test_an_adapter_rewritten_in_place_is_refused_when_read_again(tiny_llama_dir: Path, peft, tmp_path: Path):
    """Files overwritten under a registration (a retrained adapter saved into the same folder) are other
    weights than its name stands for, and than its cached K/V came from: read again, they are refused."""
    _, paths = peft
    folder = shutil.copytree(paths["r4-attn"], tmp_path / "x")
    e = engine(tiny_llama_dir, lora_modules=[f"x={folder}", f"y={paths['r8-all']}"], max_loras=1, max_cpu_loras=1)
    prompt = SYSTEM + [5, 6, 7]
    run_to_completion(e, {"old": (prompt, GREEDY)}, {"old": "x"})
    for f in paths["r8-rslora"].iterdir():  # in place: the folder itself is not replaced
        (folder / f.name).write_bytes(f.read_bytes())
    run_to_completion(e, {"y": (prompt, GREEDY)}, {"y": "y"})  # x's CPU copy makes room for y's
    with pytest.raises(AdapterChangedError):
        e.add_request("new", prompt, GREEDY, "x")
    e.adapters.unregister("x")  # loaded again, it is the new weights, and shares nothing with the old
    e.adapters.register("x", folder, "lora-modules")
    assert run_to_completion(e, {"new": (prompt, GREEDY)}, {"new": "x"})["new"]["cached_tokens"] == 0
