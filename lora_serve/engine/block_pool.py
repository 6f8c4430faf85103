"""The KV cache's block ids: reference counts, the cached blocks' keys, and the free queue (after vLLM
v1's BlockPool).

- A block is held by every sequence whose block table lists it (`_refs`); a block shared by prefix
  hits stays alive while any sharer runs, so aborting one sharer never frees another's K/V.
- A full block whose K/V is complete may be cached: its key (block_hash.py) maps to it, and a
  later sequence with the same key takes it instead of computing it again.
- Blocks no sequence holds are in one queue, evicted from the head: uncached ones first (they keep
  nothing worth keeping), then cached ones least recently freed first. A sequence frees its blocks
  last block first, so its prefix, the part most likely shared, is evicted last.

What the blocks hold (zeroing on free and on eviction) is kv_cache.py's concern; this file only
says which blocks to clear: every block that turns free without a key, and every cached block
evicted for a new owner (kv_cache.py: a block handed out must be all zeros).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int, first_block: int = 1):
        """Block ids first_block..num_blocks-1 are handed out (lower ones are reserved: the pad block)."""
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(first_block, num_blocks))  # head: evicted first
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> the cached block holding it

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds: free ones and cached ones that may be evicted."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def free_blocks(self) -> list[int]:
        """In eviction order."""
        return list(self._free)

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def num_evictable(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` sit in the free queue (taking them as hits leaves that many fewer to allocate)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks` (cached hits): out of the free queue if nobody held them."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """n blocks from the head of the free queue, each held once: (the blocks, the cached ones among
        them, whose keys are dropped here and whose K/V the caller must clear)."""
        if n > len(self._free):
            raise RuntimeError(f"{n} KV blocks asked, {len(self._free)} free")  # the scheduler checks first
        blocks, evicted = [], []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if self._forget(b):
                evicted.append(b)
            self._refs[b] = 1
            blocks.append(b)
        return blocks, evicted

    def release(self, blocks: Iterable[int]) -> list[int]:
        """One holder less for each of `blocks`; returns those that turned free uncached (to be cleared).
        Cached ones go to the tail of the queue in the order given, uncached ones to the head."""
        cleared = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                if b not in self._key_of:
                    self._free.move_to_end(b, last=False)
                    cleared.append(b)
        return cleared

    def cache(self, block: int, key: bytes) -> None:
        """Map `key` to `block`, unless either is mapped already (a second block computed with the same
        key stays uncached: the first one answers lookups)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def uncache(self, blocks: Iterable[int]) -> list[int]:
        """Drop the keys of `blocks`; returns those of them that are free (to be cleared), now at the head."""
        cleared = []
        for b in blocks:
            if self._forget(b) and self._refs[b] == 0:
                self._free.move_to_end(b, last=False)
                cleared.append(b)
        return cleared

    def uncache_all(self) -> list[int]:
        return self.uncache(list(self._key_of))

    def _forget(self, block: int) -> bool:
        key = self._key_of.pop(block, None)
        if key is None:
            return False
        del self._block_of[key]
        return True
