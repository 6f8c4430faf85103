"""A step that mixes decodes of different context lengths with a long and a short prefill chunk gives
every sequence the logits it gets alone, and a decode's result does not change when a long prefill
joins its step (attention groups: engine/attention_groups.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_serve.config import CacheConfig
from lora_serve.engine.attention_groups import build_groups
from lora_serve.engine.kv_cache import PAD_BLOCK, KVCache
from lora_serve.engine.model_runner import ModelRunner
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.sequence import Sequence
from lora_serve.model.loader import load_model

BLOCK = 16
DECODE_CONTEXTS = [3, 20, 47, 130]  # one to nine blocks: the shortest land in other buckets than the longest
LONG, LONG_CACHED = 400, 150  # a 250-token chunk after 150 tokens of its prompt
SHORT = 9
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # measured: 3e-7 and 0 (logits up to ~0.8)


@pytest.fixture(params=[(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                ids=["float32", "bfloat16", "float32-cpu-kernels"])  # fmt: skip
def rig(tiny_llama_dir: Path, request: pytest.FixtureRequest) -> tuple[ModelRunner, KVCache]:
    """A runner on torch's ops, or on the CPU kernels and layer ops (decodes and chunks attend in place: cpu_attention.c)."""
    device = torch.device("cpu")
    dtype, on_kernels = request.param
    model = load_model(tiny_llama_dir, dtype, device, max_len=512)
    if on_kernels:
        model.use_cpu_kernels(request.getfixturevalue("kernels"))
    kv = KVCache(model.arch, CacheConfig(block_size=BLOCK, kv_cache_memory_gb=0.01), dtype, device, 512)
    return ModelRunner(model, kv), kv


def sequence(kv: KVCache, request_id: str, prompt: list[int]) -> Sequence:
    seq = Sequence(request_id, prompt, SamplingParams(max_tokens=1), torch.Generator())
    kv.allocate(seq, len(prompt))
    return seq


def prompt(length: int, seed: int) -> list[int]:
    return [(seed * 131 + 17 * j) % 4000 + 30 for j in range(length)]


def step(runner: ModelRunner, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
    return runner.run([s for s, _ in batch], [n for _, n in batch])


def mixed_batch(runner: ModelRunner, kv: KVCache) -> list[tuple[Sequence, int]]:
    """Decodes (their context but the last token cached), the long prompt's second chunk, a whole short prompt."""
    decodes = [sequence(kv, f"d{i}", prompt(n, i)) for i, n in enumerate(DECODE_CONTEXTS)]
    long = sequence(kv, "long", prompt(LONG, 10))
    for seq in decodes:
        step(runner, [(seq, seq.num_tokens - 1)])
    step(runner, [(long, LONG_CACHED)])
    return [(s, 1) for s in decodes] + [(long, LONG - LONG_CACHED), (sequence(kv, "short", prompt(SHORT, 11)), SHORT)]


def test_mixed_step_gives_each_sequence_its_logits_alone(rig: tuple[ModelRunner, KVCache], tiny_llama_dir: Path):
    runner, kv = rig
    batch = mixed_batch(runner, kv)
    mixed = step(runner, batch)  # [6, vocab]: every sequence completes its prompt
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, (seq, n) in enumerate(batch):
        alone = sequence(kv, seq.request_id, seq.prompt_token_ids)
        if seq.num_tokens > n:  # its earlier tokens, as in the mixed run
            step(runner, [(alone, seq.num_tokens - n)])
        expected = step(runner, [(alone, n)])[0]
        assert torch.allclose(mixed[i], expected, rtol=0, atol=TOLERANCE[runner.model.dtype]), seq.request_id
        if runner.model.dtype == torch.float32:  # and transformers' own forward over the whole sequence
            with torch.no_grad():
                reference = hf(torch.tensor([seq.prompt_token_ids])).logits[0, -1]
            assert torch.allclose(mixed[i], reference, rtol=0, atol=1e-4), seq.request_id


def test_decodes_do_not_change_when_a_long_prefill_joins(rig: tuple[ModelRunner, KVCache]):
    runner, kv = rig
    batch = mixed_batch(runner, kv)
    decodes, long = batch[: len(DECODE_CONTEXTS)], batch[len(DECODE_CONTEXTS)]
    alone = step(runner, decodes)
    for seq, n in decodes:
        seq.num_cached_tokens -= n  # run the same tokens again: their K/V are rewritten with the same values
    beside = step(runner, decodes + [long])[: len(decodes)]
    assert torch.allclose(beside, alone, rtol=0, atol=1e-5)


def test_decodes_are_padded_only_among_themselves():
    tables = [[1], [2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [20 + i for i in range(25)], [50]]
    query_lens = [1, 1, 1, 1, 250, 9]
    context_lens = [3, 20, 130, 12, 400, 9]
    groups = build_groups(tables, query_lens, context_lens, BLOCK, torch.device("cpu"))
    decode_groups = [g for g in groups if g.query_len == 1]
    prefill_groups = [g for g in groups if g.query_len > 1]
    # Buckets: 130 alone; 20 and 12 (not under half of 20); 3.
    assert [g.token_index.tolist() for g in decode_groups] == [[2], [1, 3], [0]]
    assert [g.key_len for g in decode_groups] == [130, 20, 3]
    assert decode_groups[1].context_blocks.tolist() == [[2, 3], [13, PAD_BLOCK]]
    assert decode_groups[0].mask is None and decode_groups[1].mask is not None
    # Each prefill alone, over exactly its own context, causal from its first new token.
    long, short = prefill_groups
    assert long.token_index.tolist() == list(range(4, 254)) and long.key_len == 400 and long.batch_size == 1
    assert long.mask[0, 0].sum(-1).tolist() == list(range(151, 401))
    assert short.token_index.tolist() == list(range(254, 263)) and short.key_len == 9
    assert short.causal and short.mask is None  # a whole prompt: SDPA's own causal mask
