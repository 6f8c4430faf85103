"""The paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences, with
automatic prefix caching.

Each layer's K and V live in flat tensors [num_blocks * block_size, KV, D]; a sequence owns a list of
block ids (its block table). Blocks are handed out and returned here (their ids, reference counts
and keys: block_pool.py); a full cache makes the scheduler wait or preempt, never fail.

Prefix caching (enable_prefix_caching): every full block is keyed by its parent's key, its token ids
and the identity of the weights that computed it (block_hash.py). A waiting sequence starts from the
longest chain of cached blocks matching its tokens (`cached_prefix`) and prefills only the rest; a
prompt wholly cached still computes its last block, as the model must produce its next-token logits.
A block's key is registered in the step that schedules its last token: each layer writes every
token's K/V before any row attends (model/attention.py), so a sequence admitted later in the same
step can already share it. Freed blocks keep their keys and are evicted least recently used, only
when a block is needed. If a step fails, the keys are dropped (`reset_prefix_cache`): blocks
registered in it may hold partial K/V.

Isolation: attention reads whole blocks, masked positions included, and a masked score still
multiplies its value (softmax weight 0 x Inf = NaN). So no request may ever read a value another
request wrote, except a cached block's, whose key names every token and weight that computed it.
Three rules make that hold:
- every free uncached block is all zeros: blocks are cleared when they turn free without a key
  (whatever their values were, Inf and NaN included), and a cached block when it is evicted for a
  new owner, or loses its key while free;
- a request that fails (non-finite logits) drops its blocks' keys, so nothing it wrote is shared;
- block 0 is never handed out: it stays zero and is the padding block of every sequence's context
  (see ModelRunner.prepare).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from ..config import CacheConfig
from ..model.arch import ModelArch
from .block_hash import block_hash, root_hash
from .block_pool import BlockPool
from .sequence import Sequence

PAD_BLOCK = 0  # always zero; pads the block tables of shorter contexts


class KVCache:
    def __init__(self, arch: ModelArch, config: CacheConfig, dtype: torch.dtype, device: torch.device, max_model_len: int):
        self.block_size = config.block_size
        self.enable_prefix_caching = config.enable_prefix_caching
        bytes_per_token = 2 * arch.num_layers * arch.kv_size * torch.tensor([], dtype=dtype).element_size()
        num_blocks = int(config.kv_cache_memory_gb * 2**30) // (bytes_per_token * self.block_size)
        if (num_blocks - 1) * self.block_size < max_model_len:
            raise ValueError(
                f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds {max(num_blocks - 1, 0) * self.block_size} "
                f"tokens, fewer than max_model_len={max_model_len}; raise it or lower max_model_len"
            )
        self.num_blocks = num_blocks
        # [layers, K|V, blocks * block_size, KV, D] in one tensor, so clearing freed blocks is one op.
        self._pool = torch.zeros(
            (arch.num_layers, 2, num_blocks * self.block_size, arch.num_kv_heads, arch.head_dim), dtype=dtype, device=device
        )
        self._blocks = self._pool.view(arch.num_layers, 2, num_blocks, -1)  # [layers, 2, blocks, block_size*KV*D]
        self.k = [self._pool[i, 0] for i in range(arch.num_layers)]
        self.v = [self._pool[i, 1] for i in range(arch.num_layers)]
        self.pool = BlockPool(num_blocks, first_block=PAD_BLOCK + 1)
        # vLLM's prefix-cache counters, in prompt tokens: looked up at admission, and found cached.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        # The same per adapter ("" the base, "+composed" every composition): (queries, hits), replaced whole so that a reader on another
        # thread (metrics) never sees one updated without the other.
        self.prefix_counts_by_adapter: dict[str, tuple[int, int]] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are evicted when needed)."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_usable_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # --- prefix caching ---------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence, merged_identity: str | None) -> list[int]:
        """The longest chain of cached blocks holding the K/V of a waiting sequence's first tokens, as
        the weights in use now (merged_identity: the merged adapter's, None) compute them. It covers
        at most num_tokens - 1 tokens: the last one runs, for the logits."""
        if not (self.enable_prefix_caching and seq.is_prefix_cacheable) or seq.block_table:
            return []
        self._root(seq, merged_identity)  # its blocks are cached under this root as they fill
        if not seq.may_reuse_cached_prefix:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, num_full)
        hits = []
        for key in seq.block_hashes[:num_full]:
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def reset_prefix_cache(self) -> None:
        """Drop every key (after a failed step: blocks registered in it may hold partial K/V)."""
        self._clear(self.pool.uncache_all())

    def _root(self, seq: Sequence, merged_identity: str | None) -> None:
        root = _root_hash(seq, merged_identity)
        if seq.hash_root != root:
            seq.hash_root, seq.block_hashes = root, []

    def _hash_blocks(self, seq: Sequence, num_full: int) -> None:
        """Extend seq.block_hashes to its first num_full blocks."""
        bs, hashes = self.block_size, seq.block_hashes
        assert seq.hash_root is not None  # _root first
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else seq.hash_root, seq.token_ids(i * bs, (i + 1) * bs)))

    def _register(self, seq: Sequence, start: int, end: int, merged_identity: str | None) -> None:
        """Cache the blocks completed by tokens [start, end), which this step computes. A sequence whose
        earlier tokens ran on other weights (a merge or unmerge since its admission) caches no more
        blocks until it is admitted again: their K/V match no key."""
        if not (self.enable_prefix_caching and seq.is_prefix_cacheable) or seq.hash_root is None:
            return
        if seq.hash_root != _root_hash(seq, merged_identity):
            seq.hash_root, seq.block_hashes = None, []
            return
        first, num_full = start // self.block_size, end // self.block_size
        self._hash_blocks(seq, num_full)
        for i in range(first, num_full):
            self.pool.cache(seq.block_table[i], seq.block_hashes[i])

    # --- allocation -------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_tokens: int, hits: Seq[int] = ()) -> bool:
        """Room for `seq` to hold num_tokens tokens, starting from the cached blocks `hits` if it has
        none yet. A hit that sits in the free queue is one block fewer to allocate from it."""
        need = max(0, self.blocks_needed(seq, num_tokens) - len(hits))
        return need <= self.pool.num_free - self.pool.num_evictable(hits)

    def allocate(self, seq: Sequence, num_tokens: int, hits: Seq[int] = (), merged_identity: str | None = None) -> None:
        """Give `seq` the blocks for num_tokens tokens, the first ones the cached `hits` (a sequence with
        no blocks: its K/V up to there need not be computed), and cache the blocks this step fills."""
        if not seq.block_table:
            num_hit = len(hits) * self.block_size
            self.num_prefix_queries += seq.num_tokens
            self.num_prefix_hits += num_hit
            label = seq.metrics_label
            queries, found = self.prefix_counts_by_adapter.get(label, (0, 0))
            self.prefix_counts_by_adapter[label] = (queries + seq.num_tokens, found + num_hit)
            if seq.num_prefix_cached_tokens is None:  # reported once, as at the first admission (vLLM)
                seq.num_prefix_cached_tokens = num_hit
            if hits:
                self.pool.touch(hits)  # before taking new blocks: none of them is evicted for those
                seq.block_table = list(hits)
                seq.num_cached_tokens = num_hit
        new, evicted = self.pool.take(self.blocks_needed(seq, num_tokens))
        self._clear(evicted)
        seq.block_table += new
        self._register(seq, seq.num_cached_tokens, num_tokens, merged_identity)

    def free(self, seq: Sequence, keep_cached: bool = True) -> None:
        """Return seq's blocks, last first (its prefix is evicted last). keep_cached False: drop their
        keys too (a request that failed: nothing it wrote is shared again)."""
        if not keep_cached:
            self._clear(self.pool.uncache(seq.block_table))
        self._clear(self.pool.release(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.hash_root, seq.block_hashes = None, []  # the weights may differ when it is admitted again

    def forget_adapter(self, name: str) -> None:
        """Drop an unregistered adapter's counters: names come and go, and counters kept for each would
        grow without bound (its blocks need no care: their keys name its weights, which nothing else has)."""
        self.prefix_counts_by_adapter.pop(name, None)

    def _clear(self, blocks: list[int]) -> None:
        if blocks:
            self._blocks.index_fill_(2, torch.tensor(blocks, device=self._pool.device), 0)


def _root_hash(seq: Sequence, merged_identity: str | None) -> bytes:
    """The root of seq's chain with the weights in use now (block_hash.py)."""
    return root_hash(merged_identity, seq.adapter_identity, seq.params.cache_salt)
