"""Turns a scheduled batch into model inputs, runs the forward pass, returns the logits of the
sequences whose prompt is complete after it (a prefill chunk that leaves some of its prompt for
later steps has nothing to sample)."""

from __future__ import annotations

import torch

from ..model.attention import AttentionMetadata
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .attention_groups import build_groups
from .kv_cache import KVCache
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
        dev = self.device
        q_lens, ctx = torch.tensor(query_lens), torch.tensor(context_lens)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_size=bs,
            groups=build_groups([s.block_table for s in seqs], query_lens, context_lens, bs, dev),
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
