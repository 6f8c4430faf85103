"""The paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

Each layer's K and V live in flat tensors [num_blocks * block_size, KV, D]; a
sequence owns a list of block ids (its block table). Blocks are handed out and
returned here; a full cache makes the scheduler wait or preempt, never fail.

Isolation: attention reads whole blocks, masked positions included, and a masked
score still multiplies its value (softmax weight 0 x Inf = NaN). So no request may
ever read a value another request wrote. Two rules make that hold:
- every free block is all zeros: `free` clears a sequence's blocks before they can be
  handed out again (whatever its values were, Inf and NaN included);
- block 0 is never handed out: it stays zero and is the padding block of every
  sequence's context (see ModelRunner.prepare).
"""

from __future__ import annotations

import torch

from ..config import CacheConfig
from ..model.arch import ModelArch
from .sequence import Sequence

PAD_BLOCK = 0  # always zero; pads the block tables of shorter contexts


class KVCache:
    def __init__(self, arch: ModelArch, config: CacheConfig, dtype: torch.dtype, device: torch.device, max_model_len: int):
        self.block_size = config.block_size
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
        self._free = list(range(num_blocks - 1, PAD_BLOCK, -1))  # popped from the end: low ids first

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_usable_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        if seq.block_table:
            self._blocks.index_fill_(2, torch.tensor(seq.block_table, device=self._pool.device), 0)
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached_tokens = 0
