"""Every decoder layer of a step in one call (model/cpu_layers.py, cpu_layers.c) gives the bits of the
layer-by-layer path, with and without adapters, and steps it does not cover run layer by layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.kv_cache import KVCache
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.model_runner import ModelRunner
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.sequence import Sequence
from lora_serve.model.cpu_kernels import CPUKernels, SegmentTable
from lora_serve.model.kernel_rows import ALL_BUCKETS
from lora_serve.model.loader import load_model

from ..engine.helpers import run_to_completion
from ..lora.conftest import ATTN, MLP, make_peft_adapters

BLOCK = 16


def prompt(length: int, seed: int) -> list[int]:
    return [(seed * 131 + 17 * j) % 4000 + 30 for j in range(length)]


@pytest.fixture(params=[("tiny_llama_dir", ALL_BUCKETS), ("tiny_qwen2_dir", ALL_BUCKETS), ("tiny_qwen2_dir", frozenset({1, 2, 4, 8}))],
                ids=["llama", "qwen2", "qwen2-blas"])  # fmt: skip
def rig(request: pytest.FixtureRequest, kernels: CPUKernels) -> tuple[ModelRunner, KVCache]:
    """Qwen2 has a q/k/v bias. With the kernels' matmuls for at most 8 rows, a 24-row step multiplies on BLAS
    (as F.linear does layer by layer), its bias first in the output."""
    device = torch.device("cpu")
    name, buckets = request.param
    model = load_model(request.getfixturevalue(name), torch.float32, device, max_len=512)
    model.use_cpu_kernels(kernels, buckets)
    kv = KVCache(model.arch, CacheConfig(block_size=BLOCK, kv_cache_memory_gb=0.01), torch.float32, device, 512)
    return ModelRunner(model, kv), kv


def sequence(kv: KVCache, request_id: str, tokens: list[int]) -> Sequence:
    seq = Sequence(request_id, tokens, SamplingParams(max_tokens=1), torch.Generator())
    kv.allocate(seq, len(tokens))
    return seq


def caches(runner: ModelRunner) -> list[torch.Tensor]:
    return [c.clone() for a in runner.model.attention_layers() for c in (a.k_cache, a.v_cache)]


def test_a_step_in_one_call_gives_the_bits_of_the_layer_by_layer_step(rig: tuple[ModelRunner, KVCache]):
    """Decodes of contexts in three buckets (three decode groups), a 12-token chunk after 30 cached tokens and
    a whole 9-token prompt (two chunk groups): the logits and the K/V written equal the per-layer path's."""
    runner, kv = rig
    fused = runner.model.decoder_layers
    assert fused is not None
    decodes = [sequence(kv, f"d{i}", prompt(n, i)) for i, n in enumerate([3, 20, 47])]
    chunked = sequence(kv, "chunked", prompt(42, 7))
    for seq in decodes:
        runner.run([seq], [seq.num_tokens - 1])
    runner.run([chunked], [30])
    batch = decodes + [chunked, sequence(kv, "short", prompt(9, 8))]
    counts = [1, 1, 1, 12, 9]

    calls = fused.calls
    one_call = runner.run(batch, counts)
    assert fused.calls == calls + 1
    written = caches(runner)
    for seq, n in zip(batch, counts):
        seq.num_cached_tokens -= n  # the same tokens again, layer by layer
    runner.model.decoder_layers = None
    try:
        per_layer = runner.run(batch, counts)
    finally:
        runner.model.decoder_layers = fused
    assert torch.equal(one_call, per_layer)
    assert all(torch.equal(a, b) for a, b in zip(written, caches(runner)))


def test_steps_the_kernels_do_not_cover_whole_run_layer_by_layer(rig: tuple[ModelRunner, KVCache]):
    """A 200-token chunk (past the chunk kernel's 128 queries: SDPA) and a bfloat16 cache: not one call."""
    runner, kv = rig
    fused = runner.model.decoder_layers
    assert fused is not None
    calls = fused.calls
    logits = runner.run([sequence(kv, "long", prompt(200, 3))], [200])
    assert fused.calls == calls and torch.isfinite(logits).all()
    runner.run([sequence(kv, "short", prompt(5, 4))], [5])
    assert fused.calls == calls + 1


def engine(model_dir: Path, modules: list[str]) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(cpu_kernels="on"),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=8),
        cache=CacheConfig(kv_cache_memory_gb=0.05),
        lora=LoRAConfig(max_lora_rank=16, lora_dtype="float16", lora_modules=modules),
    )
    return LLMEngine.from_config(config, model_dir)


ADAPTERS = {
    "r16-all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "r4-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "r8-mlp": dict(r=8, lora_alpha=16, target_modules=MLP),
    "dora": dict(r=8, lora_alpha=16, target_modules=ATTN, use_dora=True),
}


@pytest.fixture(scope="module")
def adapter_modules(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    _, paths = make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("fused-adapters"), ADAPTERS)
    return [f"{n}={p}" for n, p in paths.items()]


@pytest.mark.parametrize("with_dora", [False, True], ids=["lora", "with-a-dora-adapter"])
def test_steps_with_adapters_give_the_layer_by_layer_tokens_and_logprobs(tiny_llama_dir, adapter_modules, with_dora):
    """Base rows and three adapters of unequal ranks and targets (float16, on the kernels' tables), greedy and
    seeded: the same tokens and logprobs, bit for bit, with the layers in one call as without; a batch with
    a DoRA adapter (whose ratio the kernels' call does not apply) runs layer by layer while it is there."""
    plan = [None, "r16-all", "r4-attn", "r8-mlp", "r16-all", None, "r8-mlp", "dora" if with_dora else "r4-attn"]
    requests = {
        f"s{i}": (
            prompt(10 + 3 * i, i),
            SamplingParams(max_tokens=10, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True, logprobs=2),
        )
        for i in range(len(plan))
    }
    loras = {f"s{i}": a for i, a in enumerate(plan)}
    on, off = engine(tiny_llama_dir, adapter_modules), engine(tiny_llama_dir, adapter_modules)
    off.model.decoder_layers = None
    got, want = run_to_completion(on, requests, loras), run_to_completion(off, requests, loras)
    for rid in requests:
        assert got[rid]["tokens"] == want[rid]["tokens"], rid
        assert [(lp.logprob, lp.top) for lp in got[rid]["logprobs"]] == [(lp.logprob, lp.top) for lp in want[rid]["logprobs"]]
    assert on.model.decoder_layers is not None
    steps = on.model.decoder_layers.calls
    assert steps == (0 if with_dora else 10)  # the 164-row prefill (its matmuls on BLAS) and the 9 decode steps


def test_a_segment_past_a_slot_table_is_refused_before_anything_is_written(tiny_llama_dir, adapter_modules):
    e = engine(tiny_llama_dir, adapter_modules)
    fused = e.model.decoder_layers
    assert fused is not None
    seen = []
    run = fused.run
    fused.run = lambda x, meta, lora: seen.append((x.clone(), meta, lora)) or run(x, meta, lora)  # type: ignore[method-assign]
    run_to_completion(e, {"r": (prompt(12, 1), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))}, {"r": "r16-all"})
    x, meta, lora = seen[-1]

    class PastTheTables:
        def kernel_segments(self) -> SegmentTable:
            return SegmentTable([(10_000, 0, x.shape[0])])

    before, stream = caches(ModelRunner(e.model, e.kv_cache)), x.clone()
    with pytest.raises(ValueError, match="slot 10000"):
        run(stream, meta, PastTheTables())  # type: ignore[arg-type]
    assert torch.equal(stream, x) and all(torch.equal(a, b) for a, b in zip(before, caches(ModelRunner(e.model, e.kv_cache))))
