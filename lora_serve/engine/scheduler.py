"""Continuous batching with chunked prefill: decides, every step, which sequences run and how many tokens each.

A step holds at most `max_num_batched_tokens` tokens. Running sequences come first, decodes
(one token each) before prompts still being prefilled, so a long prompt never keeps a stream
out of a step (the step itself still grows with the chunk: see bench/prefill_stall.py); then waiting
sequences are admitted while the batch size and the KV cache allow. A prompt is prefilled in chunks of
what the step's budget has left, at most `long_prefill_token_threshold` tokens a step, and samples its
first token only in the step that completes it. While streams decode, long prompts get only the
chunk that sizes the step to `max_prefill_stall` decode steps, plus `max_prefill_stall - 1` for each
further long prompt waiting (prefill_pacer.py). When the cache cannot hold the next chunk of a
running sequence, the newest running sequence is preempted (its blocks freed, to be recomputed later)
rather than failing anyone.

Admission is adapter-aware with a fairness bound. Waiting sequences that load no adapter weights go
first: base-model requests and those whose adapter is on the device already (every adapter of the
running batch is: a running sequence pins its slot); then the rest; each group in arrival order. The
preference saves slot loads and keeps fewer distinct adapters in each step, whose weights every decode
reads. But no waiting sequence is overtaken by more than `max_lora_bypass` later arrivals: one that has
been blocks everything behind it, as first come, first served would, until it is admitted (0: strict
FCFS). So a request whose adapter finds every slot pinned gets the next one that frees up, since later
requests stop pinning slots (cf. SGLang's LoRA-aware scheduling, S-LoRA's VTC). The KV cache is first
come, first served in that order: when the next in line does not fit, nobody behind it is admitted.

Prefix caching (kv_cache.py): a waiting sequence is admitted from the longest chain of cached blocks
holding its first tokens, keyed with the weights in use this step (`merged_identity`); it then needs
only the blocks, and the step's budget, of the rest. Sequences admitted together with one prompt share
its blocks as soon as the first one's chunk schedules them, so the prompt is prefilled once. Preempted
blocks stay cached: a preempted sequence is usually readmitted from its own blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from .kv_cache import KVCache
from .prefill_pacer import PrefillPacer
from .sequence import Sequence, SequenceStatus


class AdapterAdmission(Protocol):
    """Lets the LoRA manager hold a sequence back until its adapter has a device slot."""

    def try_admit(self, seq: Sequence) -> bool: ...  # pins a slot holding seq's adapter; False: none this step

    def is_resident(self, name: str) -> bool: ...  # its weights are on the device now: admitting it loads nothing

    def release_slot(self, seq: Sequence) -> None: ...


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes, then prefill chunks of running sequences, then newly admitted ones
    num_new_tokens: list[int]  # tokens each runs this step: 1 for a decode, the chunk for a prefill
    num_decodes: int = 0  # of them, decodes (they come first)

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
        max_lora_bypass: int = 16,
        long_prefill_token_threshold: int | None = None,
        merged_identity: Callable[[], str | None] | None = None,
        max_prefill_stall: float | None = None,
    ):
        """merged_identity: the identity of the adapter merged into the base weights now (None: none),
        which every row's K/V depends on (block_hash.py). max_prefill_stall: see PrefillPacer (None: off);
        the engine reports each step's time to `observe`."""
        self.kv = kv_cache
        self.max_chunk = long_prefill_token_threshold or max_num_batched_tokens
        self.max_lora_bypass = max_lora_bypass
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission
        self.merged_identity = merged_identity or (lambda: None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.pacer = PrefillPacer(max_prefill_stall) if max_prefill_stall is not None else None
        self._paced: int | None = None  # tokens of long prompts this step may still prefill (None: no limit)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        merged = self.merged_identity()  # merges happen between steps: one value for the whole step
        decoding = sum(s.num_new_tokens == 1 for s in self.running)
        # No decodes: no pace (allowance is None), and no need to count the long prompts.
        self._paced = self.pacer.allowance(decoding, self._num_long()) if self.pacer is not None and decoding else None
        seqs, chunks = self._schedule_running(budget, merged)
        admitted, admitted_chunks = self._admit(budget - sum(chunks), merged)
        num_decodes = sum(s.num_new_tokens == 1 for s in seqs)  # the decodes preemption left
        return ScheduledBatch(seqs + admitted, chunks + admitted_chunks, num_decodes)

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        """The time `batch` took, from its scheduling to its outputs (the pacer's measure)."""
        if self.pacer is not None:
            self.pacer.observe(batch.num_decodes, batch.num_tokens - batch.num_decodes, seconds)

    def _num_long(self) -> int:
        """Long prompts waiting for their first token that this step could run: those being prefilled, and
        as many waiting ones, from the front, as the batch has room for (judged on their whole prompts:
        their cached prefixes are looked up only when they are admitted)."""
        assert self.pacer is not None
        prefilling = sum(self.pacer.is_long(_prefill_size(s)) for s in self.running if s.num_new_tokens > 1)
        room = max(self.max_num_seqs - len(self.running), 0)
        return prefilling + sum(self.pacer.is_long(s.num_tokens) for s in islice(self.waiting, room))

    def _chunk(self, num_new_tokens: int, budget: int, prefill: int) -> int:
        """prefill: the tokens the sequence's prefill computes in all (what the pacer judges long or not)."""
        n = min(num_new_tokens, self.max_chunk, budget)
        paced = self._pace_left(num_new_tokens, prefill)
        return n if paced is None else min(n, paced)

    def _pace_left(self, num_new_tokens: int, prefill: int) -> int | None:
        """The tokens this step's pace leaves a long prompt; None: this chunk is not paced."""
        if self._paced is None or num_new_tokens <= 1 or self.pacer is None or not self.pacer.is_long(prefill):
            return None
        return self._paced

    def _spend(self, num_new_tokens: int, prefill: int, n: int) -> None:
        left = self._pace_left(num_new_tokens, prefill)
        if left is not None:
            self._paced = left - n

    def _schedule_running(self, budget: int, merged: str | None) -> tuple[list[Sequence], list[int]]:
        scheduled: list[Sequence] = []
        chunks: list[int] = []
        queue = sorted(self.running, key=lambda s: s.num_new_tokens > 1)  # decodes first, oldest first
        while queue:
            seq = queue.pop(0)
            prefill = _prefill_size(seq)
            n = self._chunk(seq.num_new_tokens, budget, prefill)
            if n == 0:
                continue  # the budget is spent: it keeps its blocks and goes on next step
            while not self.kv.can_allocate(seq, seq.num_cached_tokens + n):
                if not queue:  # seq itself is the newest: preempt it
                    self._preempt(seq)
                    break
                self._preempt(queue.pop())
            else:
                self.kv.allocate(seq, seq.num_cached_tokens + n, merged_identity=merged)
                scheduled.append(seq)
                chunks.append(n)
                budget -= n
                self._spend(seq.num_new_tokens, prefill, n)
        return scheduled, chunks

    def _admit(self, budget: int, merged: str | None) -> tuple[list[Sequence], list[int]]:
        admitted: list[Sequence] = []
        chunks: list[int] = []
        no_slot: set[str | None] = set()  # adapters (or compositions) that found every slot pinned (slots free only between steps)
        paced_out: list[Sequence] = []  # long prompts this step's pace left no tokens for
        while len(self.running) < self.max_num_seqs and budget > 0:
            for seq in self._admission_order(no_slot):  # computed again after each admission
                hits = self.kv.cached_prefix(seq, merged)
                num_hit = len(hits) * self.kv.block_size
                n = self._chunk(seq.num_tokens - num_hit, budget, seq.num_tokens - num_hit)
                if n == 0:
                    paced_out.append(seq)  # a long prompt, and this step's pace is spent
                    continue
                if not self.kv.can_allocate(seq, num_hit + n, hits):
                    return admitted, chunks  # nobody behind it in this order jumps it for memory
                if self.admission is not None and not self.admission.try_admit(seq):
                    no_slot.add(seq.adapter_key)
                    continue
                break
            else:
                break  # nobody left who can be admitted this step
            self._overtake(seq, paced_out)
            self.kv.allocate(seq, num_hit + n, hits, merged)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            chunks.append(n)
            budget -= n
            self._spend(seq.num_tokens - num_hit, seq.num_tokens - num_hit, n)
        return admitted, chunks

    def _admission_order(self, no_slot: set[str | None]) -> Iterator[Sequence]:
        """Waiting sequences in the order they may be admitted now: those that load no adapter, then the
        rest, each in arrival order; none behind the first that has been overtaken max_lora_bypass times."""
        rest = []
        for seq in self.waiting:
            if seq.adapter_key not in no_slot:
                if self.admission is None or all(self.admission.is_resident(name) for name in seq.adapter_names):
                    yield seq
                else:
                    rest.append(seq)
            if seq.num_bypassed >= self.max_lora_bypass:
                break  # it blocks the queue, as under FCFS, until it is admitted
        yield from (seq for seq in rest if seq.adapter_key not in no_slot)

    def _overtake(self, seq: Sequence, paced_out: list[Sequence]) -> None:
        """Take `seq` out of the queue; every sequence that arrived before it has been overtaken once more,
        but for long prompts waiting for the pace (prefill_pacer.py) to give them tokens: they wait their
        turn among long prompts, and blocking the queue would not bring it sooner."""
        for earlier in self.waiting:
            if earlier is seq:
                break
            if not any(earlier is p for p in paced_out):
                earlier.num_bypassed += 1
        self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv.free(seq)
        if self.admission is not None:
            self.admission.release_slot(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and return its blocks and adapter pin at once. The
        blocks of one that failed ("error") are not kept cached."""
        # Blocks and pin first, then the queue: a thread that sees the engine idle sees them returned too.
        if seq.status is SequenceStatus.RUNNING:
            self.kv.free(seq, keep_cached=reason != "error")
            if self.admission is not None:
                self.admission.release_slot(seq)
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.kv.free(seq)
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _prefill_size(seq: Sequence) -> int:
    """The tokens a running sequence's prefill computes in all, not what is left (what the pacer judges long)."""
    return seq.num_tokens - (seq.num_prefix_cached_tokens or 0)
