"""The prefix cache's parts: the key chain (block_hash.py) and the block pool (block_pool.py): eviction
order, reference counts under sharing, one block per key."""

from __future__ import annotations

import pytest

from lora_serve.engine.block_hash import block_hash, root_hash
from lora_serve.engine.block_pool import BlockPool

A, B = "a" * 64, "b" * 64  # two adapter identities


def chain(root: bytes, blocks: list[list[int]]) -> list[bytes]:
    keys: list[bytes] = []
    for tokens in blocks:
        keys.append(block_hash(keys[-1] if keys else root, tokens))
    return keys


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ((None, None), (None, A)),  # the base and an adapter
        ((None, A), (None, B)),  # two adapters
        ((None, A), (A, A)),  # an adapter, unmerged and merged
        ((None, None), (A, None)),  # the base, and the base while A is merged
        ((A, None), (B, None)),  # the base, under two merged adapters
    ],
)
def test_same_tokens_under_other_weights_get_other_keys(one, other):
    tokens = [[1, 2, 3, 4], [5, 6, 7, 8]]
    first, second = chain(root_hash(*one), tokens), chain(root_hash(*other), tokens)
    assert not set(first) & set(second)
    assert chain(root_hash(*one), tokens) == first  # and the same weights, the same keys


def test_a_cache_salt_roots_its_own_chain():
    tokens = [[1, 2, 3, 4]]
    keys = {salt: chain(root_hash(None, A, salt), tokens)[0] for salt in (None, "acme", "globex")}
    assert len(set(keys.values())) == 3
    assert root_hash(None, A) == root_hash(None, A, None)  # no salt: the chain every unsalted request shares


def test_a_change_in_one_block_changes_every_later_key():
    root = root_hash(None, A)
    keys = chain(root, [[1, 2], [3, 4], [5, 6]])
    changed = chain(root, [[1, 9], [3, 4], [5, 6]])
    assert keys[0] != changed[0] and keys[1] != changed[1] and keys[2] != changed[2]
    tail = chain(root, [[1, 2], [3, 4], [5, 7]])
    assert tail[:2] == keys[:2] and tail[2] != keys[2]


def test_token_ids_are_not_confused_across_their_bytes():
    root = root_hash(None, None)
    assert block_hash(root, [1, 256]) != block_hash(root, [256, 1]) != block_hash(root, [257])


def test_eviction_order_uncached_first_then_least_recently_freed():
    pool = BlockPool(9)  # blocks 1..8
    first, _ = pool.take(3)
    second, _ = pool.take(3)
    for i, b in enumerate(first + second[:2]):
        pool.cache(b, bytes([i]))
    assert pool.release(reversed(first)) == []  # cached: nothing to clear
    assert pool.release(reversed(second)) == [second[2]]  # the uncached block turns free: cleared
    # Free queue: never used (7, 8) and the uncached block at the head, then first's blocks last-first,
    # then second's.
    taken, evicted = pool.take(8)
    assert taken == [second[2], 7, 8, *reversed(first), *reversed(second[:2])]
    assert evicted == [*reversed(first), *reversed(second[:2])]
    assert pool.num_cached == 0


def test_a_shared_block_lives_while_any_sharer_holds_it():
    pool = BlockPool(5)
    (block,), _ = pool.take(1)
    pool.cache(block, b"k")
    pool.touch([pool.lookup(b"k")])  # a second sequence hits it
    assert pool.ref_count(block) == 2
    pool.release([block])  # one sharer aborts
    assert pool.ref_count(block) == 1 and block not in pool.free_blocks()
    taken, _ = pool.take(pool.num_free)
    assert block not in taken
    pool.release(taken)
    pool.release([block])
    assert block in pool.free_blocks() and pool.lookup(b"k") == block  # freed, still cached


def test_a_hit_in_the_free_queue_is_taken_out_of_it():
    pool = BlockPool(4)
    (block,), _ = pool.take(1)
    pool.cache(block, b"k")
    pool.release([block])
    assert pool.num_free == 3 and pool.num_evictable([block]) == 1
    pool.touch([block])
    assert pool.num_free == 2 and pool.num_evictable([block]) == 0
    taken, evicted = pool.take(2)
    assert block not in taken and evicted == []


def test_one_block_per_key():
    pool = BlockPool(4)
    (b1, b2), _ = pool.take(2)
    pool.cache(b1, b"k")
    pool.cache(b2, b"k")  # computed again by a sequence admitted beside
    pool.cache(b1, b"other")
    assert pool.lookup(b"k") == b1 and not pool.is_cached(b2) and pool.lookup(b"other") is None


def test_uncaching_clears_free_blocks_only():
    pool = BlockPool(4)
    (held, freed), _ = pool.take(2)
    pool.cache(held, b"h")
    pool.cache(freed, b"f")
    pool.release([freed])
    assert pool.uncache_all() == [freed]
    assert pool.num_cached == 0 and pool.free_blocks()[0] == freed
    assert pool.release([held]) == [held]  # no key any more: cleared when it turns free
