"""Continuous batching: decides, every step, which sequences run and how many tokens each.

Running sequences decode one token each; waiting sequences are admitted first come,
first served, and their whole uncached prompt is prefilled in the same step, as long
as the step's token budget, the batch size and the KV cache allow. When the cache
cannot hold the next token of a running sequence, the newest running sequence is
preempted (its blocks freed, to be recomputed later) rather than failing anyone.
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
    seqs: list[Sequence]  # decodes, then newly admitted prefills
    num_new_tokens: list[int]

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
    ):
        self.kv = kv_cache
        self.max_slot_wait_steps = max_slot_wait_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes = self._schedule_decodes()
        budget -= len(decodes)
        prefills = self._admit(budget)
        seqs = decodes + prefills
        return ScheduledBatch(seqs, [s.num_new_tokens for s in seqs])

    def _schedule_decodes(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.kv.can_allocate(seq, seq.num_tokens):
                if not queue:  # seq itself is the newest: preempt it
                    self._preempt(seq)
                    break
                self._preempt(queue.pop())
            else:
                self.kv.allocate(seq, seq.num_tokens)
                scheduled.append(seq)
        return scheduled

    def _admit(self, budget: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        skipped: list[Sequence] = []
        hold_adapters = False  # set once a request has waited too long for a slot
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_new_tokens > budget or not self.kv.can_allocate(seq, seq.num_tokens):
                break  # FCFS: nobody jumps the queue for tokens or memory
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
            self.kv.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.num_new_tokens
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def _preempt(self, seq: Sequence) -> None:
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
