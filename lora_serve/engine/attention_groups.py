"""Which rows of a step attend together, and the padded layout each group runs on (model/attention.py).

- Decodes (one new token; a 1-token prompt chunk too) share Q=1 SDPAs, bucketed by context length:
  longest first, a row joins the current bucket unless its context is under half the bucket's
  longest. Padding at most doubles a bucket's keys, and short streams never pay for a long one.
- Each prefill chunk runs alone: its own queries against its own context, no padding at all; a
  prompt's first chunk with SDPA's own causal mask (no mask tensor).

Measured (SmolLM2-135M attention shapes, one layer, 1 CPU thread): a 512-token chunk at context 1024
beside three 30-token prompts, 23 ms apart vs 106 ms padded together; 16 prompts of 20-40 tokens,
2.0 ms apart vs 3.1 ms padded (16 of exactly 32: 2.8 vs 1.8); a 2048-token first chunk, 125 ms
causal vs 303 ms with the mask tensor; 15 decodes at context 40 beside one at 4000, 4.2 ms
bucketed vs 124 ms as one group.

No group pads to another group's lengths, so what a decode costs does not depend on the prefills
beside it. Shorter contexts in a group are padded with the all-zero PAD_BLOCK, never with another
sequence's block (kv_cache.py: no request may read what another wrote).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from ..model.attention import AttentionGroup
from .kv_cache import PAD_BLOCK


def build_groups(
    block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int, device: torch.device
) -> list[AttentionGroup]:
    """Row b runs query_lens[b] new tokens, the last of its context_lens[b]; rows are packed in order."""
    starts = [0, *accumulate(query_lens)][:-1]  # packed index of each row's first new token
    decodes = [b for b, n in enumerate(query_lens) if n == 1]
    prefills = [b for b, n in enumerate(query_lens) if n > 1]
    groups = _buckets(decodes, context_lens) + [[b] for b in prefills]

    def group(rows: list[int]) -> AttentionGroup:
        return _group(
            [block_tables[b] for b in rows], query_lens[rows[0]], [context_lens[b] for b in rows], block_size, device,
            None if len(groups) == 1 else [starts[b] for b in rows],  # one group, in packed order: nothing to gather
        )  # fmt: skip

    return [group(rows) for rows in groups]


def _buckets(rows: list[int], context_lens: list[int]) -> list[list[int]]:
    buckets: list[list[int]] = []
    for b in sorted(rows, key=lambda b: -context_lens[b]):
        if buckets and 2 * context_lens[b] >= context_lens[buckets[-1][0]]:
            buckets[-1].append(b)
        else:
            buckets.append([b])
    return [sorted(bucket) for bucket in buckets]  # packed order within a bucket


def _group(
    tables: list[list[int]], Q: int, ctx: list[int], block_size: int, device: torch.device, starts: list[int] | None
) -> AttentionGroup:
    L = max(ctx)
    num_blocks = -(-L // block_size)  # keys are gathered whole blocks at a time: fewer, larger copies
    blocks = [t[:num_blocks] + [PAD_BLOCK] * (num_blocks - len(t)) for t in tables]
    token_index = None
    if starts is not None:
        token_index = (torch.tensor(starts)[:, None] + torch.arange(Q)).flatten().to(device)  # [B*Q]
    causal = len(tables) == 1 and Q == L > 1  # a prompt's first chunk: no mask to build or apply
    mask = None
    if not causal and (Q > 1 or min(ctx) < L):
        # Query q of row b is at absolute position ctx[b] - Q + q and sees the keys up to it.
        qpos = torch.tensor(ctx, device=device)[:, None] - Q + torch.arange(Q, device=device)  # [B, Q]
        mask = (torch.arange(L, device=device) <= qpos[:, :, None]).unsqueeze(1)  # [B, 1, Q, L]
    return AttentionGroup(
        token_index=token_index,
        context_blocks=torch.tensor(blocks, device=device),
        key_len=L,
        context_lens=torch.tensor(ctx, device=device),
        mask=mask,
        causal=causal,
        batch_size=len(tables),
        query_len=Q,
    )
