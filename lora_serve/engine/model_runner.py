"""Turns a scheduled batch into model inputs, runs the forward pass, returns the logits of the
sequences whose prompt is complete after it (a prefill chunk that leaves some of its prompt for
later steps has nothing to sample)."""

from __future__ import annotations

import torch

from ..model.attention import AttentionMetadata
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .kv_cache import PAD_BLOCK, KVCache
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        self.model = model
        self.block_size = kv_cache.block_size
        self.device = model.device
        for attn, k, v in zip(model.attention_layers(), kv_cache.k, kv_cache.v):
            attn.k_cache, attn.v_cache = k, v

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        for seq, n in zip(seqs, num_new_tokens):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            input_ids += seq.token_ids(start, end)
            table = seq.block_table
            for p in range(start, end):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            query_lens.append(end - start)
            context_lens.append(end)
        B, Q = len(seqs), max(query_lens)
        dev = self.device
        max_blocks = -(-max(context_lens) // bs)
        L = max_blocks * bs  # keys are gathered whole blocks at a time: fewer, larger copies
        # Shorter contexts are padded with the all-zero PAD_BLOCK, never with another sequence's block.
        pad = lambda table: table[:max_blocks] + [PAD_BLOCK] * (max_blocks - len(table))  # noqa: E731
        context_blocks = torch.tensor([pad(s.block_table) for s in seqs])
        j = torch.arange(L)
        q_lens = torch.tensor(query_lens)
        ctx = torch.tensor(context_lens)
        # Absolute position of query i of sequence b; padding queries get 0 (they see key 0 only, never NaN).
        qi = torch.arange(Q)
        qpos = torch.where(qi[None, :] < q_lens[:, None], ctx[:, None] - q_lens[:, None] + qi[None, :], 0)  # [B, Q]
        mask = (j[None, None, :] <= qpos[:, :, None]).unsqueeze(1)  # [B, 1, Q, L]
        query_index = None
        if Q > 1:
            query_index = torch.cat([b * Q + torch.arange(n) for b, n in enumerate(query_lens)]).to(dev)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            context_blocks=context_blocks.to(dev),
            block_size=bs,
            mask=mask.to(dev),
            query_index=query_index,
            batch_size=B,
            max_query_len=Q,
            logits_index=(torch.cumsum(q_lens, 0) - 1)[ctx == torch.tensor([s.num_tokens for s in seqs])].to(dev),
        )
        return torch.tensor(input_ids, device=dev), meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new_tokens: list[int], lora: LoRABatch | None = None) -> torch.Tensor:
        """Runs num_new_tokens[i] tokens of seqs[i] and caches their K/V. Returns the last-token logits
        [R, vocab] float32 of the R sequences left with no uncached token, in batch order."""
        input_ids, meta = self.prepare(seqs, num_new_tokens)
        logits = self.model(input_ids, meta, lora)
        for seq, n in zip(seqs, num_new_tokens):
            seq.num_cached_tokens += n
        return logits
