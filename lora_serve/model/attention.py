"""Attention over a paged KV cache, for a batch that mixes prefills and decodes.

Tokens travel packed ([T, ...], no padding) through every projection. Only the
attention itself runs on a padded view: queries [B, Q] and each sequence's cached
context [B, L] gathered from the cache by slot index. The runner builds that layout
once per step (`AttentionMetadata`) and every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] absolute position of each packed token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    context_blocks: torch.Tensor  # [B, L / block_size] cache blocks of each sequence's context, padded with 0
    block_size: int
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where query may attend to key
    query_index: torch.Tensor | None  # [T] flat index of each packed token in [B*Q]; None when Q == 1
    batch_size: int
    max_query_len: int
    logits_index: torch.Tensor  # [B] packed index of each sequence's last token


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # Flat caches [num_slots, KV, D], assigned by the engine's KV cache before the first step.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H*D]
        self.k_cache.index_copy_(0, meta.slot_mapping, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(0, meta.slot_mapping, v.to(self.v_cache.dtype))
        B, Q, H, D = meta.batch_size, meta.max_query_len, self.num_heads, self.head_dim
        blocks = (-1, meta.block_size, self.num_kv_heads, D)
        keys = self.k_cache.view(blocks)[meta.context_blocks].view(B, -1, self.num_kv_heads, D).transpose(1, 2)  # [B, KV, L, D]
        values = self.v_cache.view(blocks)[meta.context_blocks].view(B, -1, self.num_kv_heads, D).transpose(1, 2)
        if meta.query_index is None:
            queries = q.view(B, 1, H, D)
        else:
            queries = q.new_zeros(B * Q, H, D)
            queries[meta.query_index] = q
            queries = queries.view(B, Q, H, D)
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=meta.mask, enable_gqa=True
        )  # [B, H, Q, D]
        out = out.transpose(1, 2).reshape(B * Q, H * D)
        return out if meta.query_index is None else out[meta.query_index]
