"""Attention over a paged KV cache, for a batch that mixes prefills and decodes.

Tokens travel packed ([T, ...], no padding) through every projection. Only the
attention itself runs on padded views, one per group of rows (`AttentionGroup`):
decodes of similar context length share one Q=1 SDPA, each prefill chunk runs
alone over its own context. So a decode row never pays for a prefill's queries or
keys beside it. The runner builds the groups once per step (attention_groups.py)
and every layer reuses them. With the CPU layer ops (float32 on the CPU), decode
groups and prefill chunks read their keys in place from the paged cache instead
(cpu_attention.c): no padded views, no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_layer_ops import CPULayerOps
from .rope import RotaryEmbedding


@dataclass
class AttentionGroup:
    """Rows attended in one SDPA: queries [B, Q] against each row's context [B, L]."""

    token_index: torch.Tensor | None  # [B*Q] packed index of each of the group's tokens, row by row; None: all T, in order
    context_blocks: torch.Tensor  # [B, L / block_size, rounded up] cache blocks of each row's context, padded with PAD_BLOCK
    key_len: int  # L: keys kept of the gathered blocks
    context_lens: torch.Tensor  # [B] int64: each row's own context length (<= L)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool, True where query may attend to key; None: every key, or causal
    causal: bool  # one row whose keys are its queries' own tokens (Q == L): SDPA's causal mask skips masked blocks
    batch_size: int  # B
    query_len: int  # Q: every row of a group has the same query length (no padded queries)


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] absolute position of each packed token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    block_size: int
    groups: list[AttentionGroup]  # together they hold each packed token exactly once
    logits_index: torch.Tensor  # [R] packed index of the last token of each sequence that samples


# Prefill chunks of at most this many queries attend through the CPU layer ops' chunk kernel, in place
# from the paged cache; longer ones through SDPA over gathered keys, whose blocking wins on many
# queries against a long context (SmolLM2's heads at context 4000, 2-vCPU Xeon, one layer: 16 queries
# 1.02 ms vs 1.73, 128 queries 7.9 vs 8.7, 256 queries 15.5 vs 13.7; docs/benchmarks.md).
CHUNK_KERNEL_MAX_QUERIES = 128


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # Flat caches [num_slots, KV, D], assigned by the engine's KV cache before the first step.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.ops: CPULayerOps | None = None  # set by LlamaModel.use_cpu_kernels

    def takes_packed(self, qkv: torch.Tensor) -> bool:
        """Whether forward_packed runs this step: the CPU layer ops are there, and qkv and the cache are float32."""
        return self.ops is not None and qkv.dtype is torch.float32 and self.k_cache.dtype is torch.float32 and qkv.is_cpu

    def check_bounds(self, meta: AttentionMetadata, num_positions: int) -> None:
        """The CPU layer ops index the caches and the rotary tables by meta without checking each index (as
        torch's ops do): refuse, once per step, metadata that would reach past them. The engine never builds
        such a step; a ValueError beats a write into another sequence's cache."""
        slots = self.k_cache.shape[0]

        def within(t: torch.Tensor, end: int, start: int = 0) -> bool:
            return t.numel() == 0 or (int(t.min()) >= start and int(t.max()) < end)

        if not within(meta.positions, num_positions) or not within(meta.slot_mapping, slots):
            raise ValueError(f"step metadata past the rotary tables ({num_positions}) or the KV cache ({slots} slots)")
        for g in meta.groups:
            if (
                (g.token_index is not None and not within(g.token_index, meta.positions.shape[0]))
                or not within(g.context_blocks, slots // meta.block_size)
                or not within(g.context_lens, g.context_blocks.shape[1] * meta.block_size + 1, g.query_len)
            ):
                raise ValueError(
                    f"an attention group's rows, blocks or context lengths reach past the step or the KV cache ({slots} slots)"
                )

    def forward_packed(self, qkv: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        """forward's work from the fused projection's output, on the CPU layer ops: rotary and the cache write
        in one call, then each group in one call that reads its keys where the cache holds them (no gather):
        decodes, and prefill chunks of up to CHUNK_KERNEL_MAX_QUERIES (longer ones run SDPA as in forward).
        qkv: [T, (H + 2 KV) D] -> [T, H*D]."""
        assert self.ops is not None
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.ops.rope_write_kv(qkv, (H, KV, D), meta.positions, rope.cos, rope.sin, meta.slot_mapping, self.k_cache, self.v_cache)
        return self._attend_groups(qkv[:, : H * D].view(-1, H, D), meta, self.ops)  # q rotated in place, rows of qkv's stride

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H*D]
        self.k_cache.index_copy_(0, meta.slot_mapping, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(0, meta.slot_mapping, v.to(self.v_cache.dtype))
        return self._attend_groups(q, meta, None)

    def _attend_groups(self, q: torch.Tensor, meta: AttentionMetadata, ops: CPULayerOps | None) -> torch.Tensor:
        # q: [T, H, D] (rows of any stride) -> [T, H*D]. With ops, decodes and chunks read the cache in place.
        T, HD = q.shape[0], self.num_heads * self.head_dim
        out = q.new_empty(T, HD)
        for g in meta.groups:
            if ops is not None and g.query_len == 1:
                ops.decode_attention(q.view(T, HD), out, g.token_index, self.k_cache, self.v_cache, g.context_blocks, g.context_lens,
                                     meta.block_size)  # fmt: skip
            elif ops is not None and self.head_dim % 8 == 0 and g.query_len <= CHUNK_KERNEL_MAX_QUERIES:
                ops.chunk_attention(q.view(T, HD), out, g.token_index, g.query_len, self.k_cache, self.v_cache, g.context_blocks,
                                    g.context_lens, meta.block_size)  # fmt: skip
            elif g.token_index is None:  # the only group: every token, in packed order
                return self._attend(q, g, meta.block_size)
            else:
                out.index_copy_(0, g.token_index, self._attend(q.index_select(0, g.token_index), g, meta.block_size))
        return out

    def _attend(self, q: torch.Tensor, g: AttentionGroup, block_size: int) -> torch.Tensor:
        # q: [B*Q, H, D] the group's queries, row by row -> [B*Q, H*D]
        B, Q, H, KV, D = g.batch_size, g.query_len, self.num_heads, self.num_kv_heads, self.head_dim

        def gather(cache: torch.Tensor) -> torch.Tensor:  # [B, KV, L, D]
            # index_select over whole blocks (rows of block_size * KV * D): a row copy, ~6x faster on
            # CPU than advanced indexing cache.view(-1, block_size, KV, D)[context_blocks], which
            # computes an offset per element.
            blocks = cache.view(-1, block_size * KV * D).index_select(0, g.context_blocks.view(-1))  # [B * L / block_size, ...]
            return blocks.view(B, -1, KV, D)[:, : g.key_len].transpose(1, 2).to(q.dtype)

        queries = q.view(B, Q, H, D).transpose(1, 2)  # [B, H, Q, D]
        out = F.scaled_dot_product_attention(
            queries, gather(self.k_cache), gather(self.v_cache), attn_mask=g.mask, is_causal=g.causal, enable_gqa=True
        )  # [B, H, Q, D]
        return out.transpose(1, 2).reshape(B * Q, H * D)
