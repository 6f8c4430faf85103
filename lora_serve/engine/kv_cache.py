"""The paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

Each layer's K and V live in flat tensors [num_blocks * block_size, KV, D]; a
sequence owns a list of block ids (its block table). Blocks are handed out and
returned here; a full cache makes the scheduler wait or preempt, never fail.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig
from ..model.arch import ModelArch
from .sequence import Sequence


class KVCache:
    def __init__(self, arch: ModelArch, config: CacheConfig, dtype: torch.dtype, device: torch.device, max_model_len: int):
        self.block_size = config.block_size
        bytes_per_token = 2 * arch.num_layers * arch.kv_size * torch.tensor([], dtype=dtype).element_size()
        num_blocks = int(config.kv_cache_memory_gb * 2**30) // (bytes_per_token * self.block_size)
        if num_blocks * self.block_size < max_model_len:
            raise ValueError(
                f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds {num_blocks * self.block_size} tokens, "
                f"fewer than max_model_len={max_model_len}; raise it or lower max_model_len"
            )
        self.num_blocks = num_blocks
        shape = (num_blocks * self.block_size, arch.num_kv_heads, arch.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached_tokens = 0
