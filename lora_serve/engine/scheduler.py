"""Continuous batching with chunked prefill: decides, every step, which sequences run and how many tokens each.

A step holds at most `max_num_batched_tokens` tokens. Running sequences come first, decodes
(one token each) before prompts still being prefilled, so a long prompt never keeps a stream
out of a step (the step itself still grows with the chunk: see bench/prefill_stall.py); then waiting sequences are admitted first come, first served, while the batch size
and the KV cache allow. A prompt is prefilled in chunks of what the step's budget has left, at
most `long_prefill_token_threshold` tokens a step, and samples its first token only in the step
that completes it. When the cache cannot hold the next chunk of a running sequence, the newest
running sequence is preempted (its blocks freed, to be recomputed later) rather than failing anyone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .kv_cache import KVCache
from .sequence import Sequence, SequenceStatus


class AdapterAdmission(Protocol):
    """Lets the LoRA manager hold a sequence back until its adapter has a device slot."""

    def try_admit(self, seq: Sequence) -> bool: ...

    def release_slot(self, seq: Sequence) -> None: ...


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes, then prefill chunks of running sequences, then newly admitted ones
    num_new_tokens: list[int]  # tokens each runs this step: 1 for a decode, the chunk for a prefill

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: AdapterAdmission | None = None,
        max_slot_wait_steps: int = 32,
        long_prefill_token_threshold: int | None = None,
    ):
        self.kv = kv_cache
        self.max_chunk = long_prefill_token_threshold or max_num_batched_tokens
        self.max_slot_wait_steps = max_slot_wait_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs, chunks = self._schedule_running(budget)
        admitted, admitted_chunks = self._admit(budget - sum(chunks))
        return ScheduledBatch(seqs + admitted, chunks + admitted_chunks)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_new_tokens, self.max_chunk, budget)

    def _schedule_running(self, budget: int) -> tuple[list[Sequence], list[int]]:
        scheduled: list[Sequence] = []
        chunks: list[int] = []
        queue = sorted(self.running, key=lambda s: s.num_new_tokens > 1)  # decodes first, oldest first
        while queue:
            seq = queue.pop(0)
            n = self._chunk(seq, budget)
            if n == 0:
                continue  # the budget is spent: it keeps its blocks and goes on next step
            while not self.kv.can_allocate(seq, seq.num_cached_tokens + n):
                if not queue:  # seq itself is the newest: preempt it
                    self._preempt(seq)
                    break
                self._preempt(queue.pop())
            else:
                self.kv.allocate(seq, seq.num_cached_tokens + n)
                scheduled.append(seq)
                chunks.append(n)
                budget -= n
        return scheduled, chunks

    def _admit(self, budget: int) -> tuple[list[Sequence], list[int]]:
        admitted: list[Sequence] = []
        chunks: list[int] = []
        skipped: list[Sequence] = []
        hold_adapters = False  # set once a request has waited too long for a slot
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            if not self.kv.can_allocate(seq, seq.num_cached_tokens + n):
                break  # FCFS: nobody jumps the queue for memory
            self.waiting.popleft()
            if hold_adapters and seq.lora_name is not None:
                skipped.append(seq)  # let the pinned slots drain for the request that waited longest
                continue
            if self.admission is not None and not self.admission.try_admit(seq):
                # Its adapter has no free slot yet. Later requests whose adapter is resident may go
                # ahead, but only for max_slot_wait_steps: then they stop pinning slots, so one frees up.
                seq.slot_wait_steps += 1
                hold_adapters = seq.slot_wait_steps > self.max_slot_wait_steps
                skipped.append(seq)
                continue
            self.kv.allocate(seq, seq.num_cached_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            chunks.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return admitted, chunks

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv.free(seq)
        if self.admission is not None:
            self.admission.release_slot(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and return its blocks and adapter pin at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
            if self.admission is not None:
                self.admission.release_slot(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
