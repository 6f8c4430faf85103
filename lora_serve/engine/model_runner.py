"""Turns a scheduled batch into model inputs, runs the forward pass, returns the logits of the
sequences whose prompt is complete after it (a prefill chunk that leaves some of its prompt for
later steps has nothing to sample).

A sequence that asks for prompt logprobs (SamplingParams.prompt_logprobs) also gets the logits of
every prompt position the step runs, chunk by chunk, turned into logprobs here and recorded on it
(engine/logprobs.py); every other sequence keeps one logits row, and only when it samples.
"""

from __future__ import annotations

import torch

from ..model.attention import AttentionMetadata
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .attention_groups import build_groups
from .kv_cache import KVCache
from .logprobs import prompt_positions, record_prompt_logprobs
from .sequence import Sequence

PromptRows = list[tuple[Sequence, range]]  # sequences and the prompt positions whose logits the step returns, in order


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        self.model = model
        self.block_size = kv_cache.block_size
        self.device = model.device
        for attn, k, v in zip(model.attention_layers(), kv_cache.k, kv_cache.v):
            attn.k_cache, attn.v_cache = k, v

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> tuple[torch.Tensor, AttentionMetadata, PromptRows]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []  # packed index of the last token of each sequence that samples
        prompt_rows: list[int] = []  # then the packed indexes of the prompt positions asked for
        wanted: PromptRows = []
        for seq, n in zip(seqs, num_new_tokens):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            offset = len(input_ids) - start  # packed index of position p: offset + p
            input_ids += seq.token_ids(start, end)
            table = seq.block_table
            for p in range(start, end):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            query_lens.append(end - start)
            context_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(offset + end - 1)
            if rows := prompt_positions(seq, start, end):
                prompt_rows += [offset + p for p in rows]
                wanted.append((seq, rows))
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_size=bs,
            groups=build_groups([s.block_table for s in seqs], query_lens, context_lens, bs, dev),
            logits_index=torch.tensor(sample_rows + prompt_rows, dtype=torch.long, device=dev),
        )
        return torch.tensor(input_ids, device=dev), meta, wanted

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new_tokens: list[int], lora: LoRABatch | None = None) -> torch.Tensor:
        """Runs num_new_tokens[i] tokens of seqs[i] and caches their K/V. Returns the last-token logits
        [R, vocab] float32 of the R sequences left with no uncached token, in batch order."""
        input_ids, meta, wanted = self.prepare(seqs, num_new_tokens)
        logits = self.model(input_ids, meta, lora)  # [R + prompt rows, vocab]
        for seq, n in zip(seqs, num_new_tokens):
            seq.num_cached_tokens += n
        num_sampling = logits.shape[0] - sum(len(rows) for _, rows in wanted)
        row = num_sampling
        for seq, rows in wanted:
            record_prompt_logprobs(seq, logits[row : row + len(rows)], rows)
            row += len(rows)
        return logits[:num_sampling]
