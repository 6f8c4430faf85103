"""Prefix caching in the scheduler and the KV cache, without a model: what a waiting sequence finds
cached, what admission counts, and what survives an abort, a preemption or a failed request."""

from __future__ import annotations

import torch

from lora_serve.config import CacheConfig
from lora_serve.engine.kv_cache import KVCache
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.scheduler import Scheduler
from lora_serve.engine.sequence import Sequence, SequenceStatus

from .test_admission import ARCH, BLOCK


def kv_cache(num_blocks: int = 64, enable: bool = True) -> KVCache:
    bytes_per_block = 2 * ARCH.num_layers * ARCH.kv_size * 4 * BLOCK  # float32
    config = CacheConfig(kv_cache_memory_gb=(num_blocks + 1) * bytes_per_block / 2**30, block_size=BLOCK, enable_prefix_caching=enable)
    return KVCache(ARCH, config, torch.float32, torch.device("cpu"), min(64, num_blocks * BLOCK))


def seq(request_id: str, prompt: list[int]) -> Sequence:
    return Sequence(request_id, list(prompt), SamplingParams(max_tokens=4), torch.Generator())


def run(s: Scheduler) -> list[Sequence]:
    """One step as the engine takes it, without the model: every scheduled token's K/V is computed, and
    each sequence left with no token to run samples one."""
    batch = s.schedule()
    for q, n in zip(batch.seqs, batch.num_new_tokens):
        q.num_cached_tokens += n
        if q.num_new_tokens == 0:
            q.output_token_ids.append(1)
    return batch.seqs


PROMPT = list(range(10, 23))  # 13 tokens: 3 full blocks of 4 and one token


def test_a_repeated_prompt_prefills_only_what_is_not_cached():
    s = Scheduler(kv_cache(), 8, 256)
    first = seq("a", PROMPT)
    s.add(first)
    run(s)
    s.finish(first, "stop")
    second = seq("b", PROMPT[:12] + [99, 98])
    s.add(second)
    batch = s.schedule()
    assert batch.num_new_tokens == [2] and second.num_prefix_cached_tokens == 12
    assert second.block_table[:3] == first_blocks(s, PROMPT)
    assert (s.kv.num_prefix_queries, s.kv.num_prefix_hits) == (13 + 14, 12)


def first_blocks(s: Scheduler, prompt: list[int]) -> list[int]:
    probe = seq("probe", prompt + [0])
    return s.kv.cached_prefix(probe, None)


def test_a_wholly_cached_prompt_still_computes_its_last_block():
    s = Scheduler(kv_cache(), 8, 256)
    prompt = PROMPT[:12]  # exactly 3 blocks
    first = seq("a", prompt)
    s.add(first)
    run(s)
    s.finish(first, "stop")
    again = seq("b", prompt)
    s.add(again)
    assert s.schedule().num_new_tokens == [4] and again.num_prefix_cached_tokens == 8


def test_sequences_admitted_together_share_the_prompt_blocks():
    """n copies of one prompt in one step: the first one's chunk schedules the blocks, the others take them."""
    s = Scheduler(kv_cache(), 8, 256)
    copies = [seq(f"n{i}", PROMPT) for i in range(3)]
    for q in copies:
        s.add(q)
    batch = s.schedule()
    assert batch.num_new_tokens == [13, 1, 1]
    assert copies[1].block_table[:3] == copies[2].block_table[:3] == copies[0].block_table[:3]
    assert len({q.block_table[3] for q in copies}) == 3  # each its own last block
    assert s.kv.pool.ref_count(copies[0].block_table[0]) == 3


def test_admission_counts_the_cached_blocks():
    """4 usable blocks: a 13-token prompt needs all 4, and again after it ran, as 3 are cached (freed but
    evictable) plus one new; a prompt that shares nothing must evict the cached ones to fit."""
    s = Scheduler(kv_cache(num_blocks=4), 8, 256)
    first = seq("a", PROMPT)
    s.add(first)
    run(s)
    s.finish(first, "stop")
    assert s.kv.num_free_blocks == 4 and s.kv.pool.num_cached == 3
    s.add(seq("b", PROMPT))
    (b,) = s.schedule().seqs
    assert b.num_prefix_cached_tokens == 12 and s.kv.num_free_blocks == 0  # its hits were not evicted for its last block
    s.finish(b, "stop")
    s.add(seq("c", list(range(50, 63))))
    (c,) = s.schedule().seqs
    assert c.num_prefix_cached_tokens == 0 and len(c.block_table) == 4 and first_blocks(s, PROMPT) == []


def test_blocks_a_running_sequence_shares_need_no_room():
    """6 usable blocks, 4 held by a running 13-token prompt: a 17-token prompt (5 blocks) sharing its
    first 3 needs only the 2 left."""
    s = Scheduler(kv_cache(num_blocks=6), 8, 256)
    s.add(seq("a", PROMPT))
    run(s)
    assert s.kv.num_free_blocks == 2
    s.add(seq("c", PROMPT[:12] + [1, 2, 3, 4, 5]))
    c = s.schedule().seqs[-1]
    assert c.num_prefix_cached_tokens == 12 and len(c.block_table) == 5 and s.kv.num_free_blocks == 0


def test_abort_of_one_sharer_keeps_the_others_blocks():
    s = Scheduler(kv_cache(), 8, 256)
    a, b = seq("a", PROMPT), seq("b", PROMPT)
    s.add(a)
    s.add(b)
    run(s)
    shared = b.block_table[:3]
    s.finish(a, "abort")
    assert all(s.kv.pool.ref_count(blk) == 1 for blk in shared)
    assert not set(shared) & set(s.kv.pool.free_blocks())
    s.add(seq("c", PROMPT))  # and they are still found
    c = s.schedule().seqs[-1]
    assert c.block_table[:3] == shared


def test_a_failed_request_leaves_nothing_cached():
    s = Scheduler(kv_cache(), 8, 256)
    a = seq("a", PROMPT)
    s.add(a)
    run(s)
    blocks = list(a.block_table)
    s.finish(a, "error")
    assert s.kv.pool.num_cached == 0 and set(blocks) <= set(s.kv.pool.free_blocks()[: len(blocks)])
    assert first_blocks(s, PROMPT) == []


def test_an_evicted_block_is_zero_when_handed_out():
    kv = kv_cache(num_blocks=4)
    s = Scheduler(kv, 8, 256)
    a = seq("a", PROMPT)
    s.add(a)
    run(s)
    for layer in kv.k + kv.v:  # what the model wrote, at worst
        layer.view(kv.num_blocks, -1)[a.block_table] = float("nan")
    s.finish(a, "stop")
    s.add(seq("b", list(range(50, 63))))
    (b,) = s.schedule().seqs
    for layer in kv.k + kv.v:
        blocks = layer.view(kv.num_blocks, -1)
        assert torch.count_nonzero(blocks[b.block_table]) == 0 and torch.count_nonzero(blocks[0]) == 0


def test_a_preempted_sequence_comes_back_to_its_own_blocks():
    s = Scheduler(kv_cache(num_blocks=6), 8, 256)
    a, b = seq("a", PROMPT), seq("b", list(range(40, 47)))
    s.add(a)
    s.add(b)
    run(s)  # a: 4 blocks, b: 2; none free
    while b.status is SequenceStatus.RUNNING:  # decodes until b needs a third block: b, the newest, is preempted
        run(s)
    assert s.num_preemptions == 1 and b.num_tokens == 9
    s.finish(a, "stop")
    (back,) = s.schedule().seqs
    assert back is b and b.num_prefix_cached_tokens == 0  # reported as at its first admission
    assert b.num_cached_tokens == 8 and s.kv.num_prefix_hits == 8  # its 2 blocks, the second holding its first output


def test_a_merge_between_steps_stops_a_running_sequence_caching():
    """Its next blocks' K/V ran partly on other weights: they match no key."""
    merged: list[str | None] = [None]
    s = Scheduler(kv_cache(), 8, 256, long_prefill_token_threshold=4, merged_identity=lambda: merged[0])
    a = seq("a", PROMPT)
    s.add(a)
    run(s)  # block 0, unmerged
    merged[0] = "m" * 64
    run(s)  # block 1, merged
    s.add(seq("b", PROMPT))
    b = s.schedule().seqs[-1]
    assert b.num_prefix_cached_tokens == 0  # block 0 is keyed unmerged, b runs merged
    merged[0] = None
    s.add(seq("c", PROMPT))
    c = run(s)[-1]
    assert c.num_prefix_cached_tokens == 4  # block 0 only


def test_disabled_caches_nothing():
    s = Scheduler(kv_cache(enable=False), 8, 256)
    for name in "ab":
        q = seq(name, PROMPT)
        s.add(q)
        run(s)
        s.finish(q, "stop")
        assert q.num_prefix_cached_tokens == 0
    assert s.kv.pool.num_cached == 0
