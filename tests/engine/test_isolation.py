"""One request can never change what another computes, whatever values it puts in the KV cache.

The attack these reproduce: a request fills its KV blocks with Inf/NaN (an adapter whose update
overflows), finishes, and its blocks go to the next requests; or it runs beside them. Attention reads
whole blocks, masked positions and padding included, and a masked Inf still gives NaN (0 x Inf), so
before kv_cache.py cleared freed blocks and padded with a reserved zero block, the victims' greedy
outputs came back empty. Here the victims' tokens and logprobs must be identical to a clean run.

Bit-for-bit equality needs the same computation each time: the victims ask for their prompts' logprobs,
so they never start from blocks the prefix cache kept from their earlier runs (that would change the
step's shapes, which matmul path runs, and the last float bits; prefix caching is held to 1e-5 in its own
tests), while the attackers' blocks still go through the cache, kept, evicted and handed on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lora_serve.bench.random_adapters import random_lora_model
from lora_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from lora_serve.engine.kv_cache import PAD_BLOCK
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams

from .conftest import make_engine
from .helpers import run_to_completion

# Lengths that leave partly filled last blocks and shorter contexts padded next to longer ones.
VICTIM_LENGTHS = [3, 17, 40, 9, 70]


def victims() -> dict[str, tuple[list[int], SamplingParams]]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3, prompt_logprobs=0)
    return {f"v{i}": ([(31 * i + 7 * j) % 4000 + 20 for j in range(n)], params) for i, n in enumerate(VICTIM_LENGTHS)}


def summary(results: dict[str, dict]) -> dict[str, tuple]:
    return {rid: (r["tokens"], [(lp.token_id, lp.logprob, lp.top) for lp in r["logprobs"]]) for rid, r in results.items()}


def poison(engine: LLMEngine, request_id: str) -> None:
    """Fill every position of the request's blocks, in every layer, with Inf keys and NaN values."""
    kv, bs = engine.kv_cache, engine.kv_cache.block_size
    for block in engine._seqs[request_id].block_table:
        for k, v in zip(kv.k, kv.v):
            k[block * bs : (block + 1) * bs] = float("inf")
            v[block * bs : (block + 1) * bs] = float("nan")


def assert_free_blocks_zero(engine: LLMEngine) -> None:
    """Every free block without a prefix-cache key (the next to be handed out) and the pad block are zero."""
    kv = engine.kv_cache
    free = torch.tensor([b for b in kv.pool.free_blocks() if not kv.pool.is_cached(b)] + [PAD_BLOCK])
    for layer in kv.k + kv.v:
        assert torch.count_nonzero(layer.view(kv.num_blocks, -1)[free]) == 0


def test_poisoned_blocks_reach_no_other_request(tiny_llama_dir: Path):
    engine = make_engine(tiny_llama_dir, kv_gb=0.01)
    clean = summary(run_to_completion(engine, victims()))

    # Beside: the attacker is admitted first (lowest block ids), poisoned, then decodes with the victims.
    engine.add_request("attacker", list(range(100, 160)), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.step()
    assert PAD_BLOCK not in engine._seqs["attacker"].block_table
    poison(engine, "attacker")
    beside = run_to_completion(engine, victims())
    assert summary({k: beside[k] for k in clean}) == clean
    assert beside["attacker"]["finish_reason"] == "error"  # its own attention reads its NaN
    assert_free_blocks_zero(engine)

    # After: the attacker's freed blocks are handed to the next requests.
    engine.add_request("attacker2", list(range(200, 290)), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    engine.step()
    poison(engine, "attacker2")
    engine.abort_request("attacker2")
    assert_free_blocks_zero(engine)
    assert summary(run_to_completion(engine, victims())) == clean


def test_non_finite_request_fails_alone(tiny_llama_dir: Path):
    """An adapter that overflows in use (weights around 1e30, as one tenant uploaded) fails its own request
    with a clear error; base requests in the same batch, and after, are unchanged. It is registered here
    past the load-time check (lora/overflow.py), which would refuse it: the engine must contain it anyway."""
    config = EngineConfig(cache=CacheConfig(kv_cache_memory_gb=0.01), scheduler=SchedulerConfig(max_model_len=256))
    engine = LLMEngine.from_config(config, tiny_llama_dir)
    clean = summary(run_to_completion(engine, victims()))
    model = random_lora_model("hostile", engine.arch, rank=4, seed=0, targets=("v_proj",))
    model.weights = {k: replace(w, A=w.A * 1e30, B=w.B * 1e30) for k, w in model.weights.items()}
    engine.adapters.register("hostile", Path("/nonexistent"), "test", model)

    requests = {"attacker": (list(range(100, 150)), SamplingParams(max_tokens=8, temperature=0.0)), **victims()}
    results = run_to_completion(engine, requests, lora={"attacker": "hostile"})
    assert summary({k: results[k] for k in clean}) == clean
    assert results["attacker"]["finish_reason"] == "error" and results["attacker"]["tokens"] == []
    assert summary(run_to_completion(engine, victims())) == clean
    assert engine.kv_cache.usage == 0.0 and engine.adapters._refs == {}
    assert_free_blocks_zero(engine)
