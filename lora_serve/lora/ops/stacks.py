"""A projection's stacked copy of the adapters its decode groups read, kept and patched across steps.

The torch backend's batched matmuls (torch_ops.py) need a group's adapters as one block per
tensor: A [C, R, in], B_s [C, out_s, r] per slice, scales [C, 1, R]. Building that block copies
every adapter of the group (16 rank-16 adapters of SmolLM2: 312 MB per step in float32), so it
is kept while the same adapters run. Under live traffic the batch changes every few steps (one
request ends, another starts), so instead of restacking, an arriving adapter is copied into the
position of one that left: one adapter's bytes, not the group's. Positions of adapters that left
and were not replaced stay until the block is rebuilt; their rows of x are zeros and their
outputs are not read, so they cost compute but never change a result. The block is rebuilt in
batch order when the new adapters outnumber the free positions or when stale positions pass a
quarter of it.

An entry is recognised by identity (a weak reference, so a block never keeps an evicted adapter's
memory alive): a slot refilled with another adapter, or the same adapter filled again, is a new entry.
"""

from __future__ import annotations

import weakref

import torch

from ..slots import SlotEntry


class AdapterStack:
    def __init__(self, entries: list[SlotEntry]):
        self.refs = [weakref.ref(e) for e in entries]  # per position: the entry copied there
        self.A = torch.stack([e.A for e in entries]).float()  # [C, R, in]
        self.scales = torch.stack([e.scales for e in entries])  # [C, 1, R]
        self.B = [torch.stack([e.layout[k][3] for e in entries]).float() for k in range(len(entries[0].layout))]
        self.num_patches = 0  # adapters copied into a position (for tests)

    @property
    def capacity(self) -> int:
        return len(self.refs)

    def positions(self, entries: list[SlotEntry]) -> list[int] | None:
        """The position of each entry, after copying the missing ones into positions no entry here
        uses; None when that does not fit, or would leave the block more than a quarter stale."""
        at = {id(ref()): p for p, ref in enumerate(self.refs) if ref() is not None}
        found = [at.get(id(e)) for e in entries]
        used = {p for p in found if p is not None}
        free = [p for p in range(self.capacity) if p not in used]
        missing = [i for i, p in enumerate(found) if p is None]
        stale = self.capacity - len(entries)
        if len(missing) > len(free) or 4 * stale > self.capacity:
            return None
        for i, p in zip(missing, free):
            self._copy(p, entries[i])
            found[i] = p
        return found  # type: ignore[return-value]  # every None was filled just above

    def _copy(self, p: int, entry: SlotEntry) -> None:
        self.A[p].copy_(entry.A)
        self.scales[p].copy_(entry.scales)
        for k, b in enumerate(self.B):
            b[p].copy_(entry.layout[k][3])
        self.refs[p] = weakref.ref(entry)
        self.num_patches += 1


def stack_for(cache: dict, entries: list[SlotEntry]) -> tuple[AdapterStack, list[int]]:
    """The block for entries of one signature on a projection (cache: that projection's stacks, by
    signature) and each entry's position in it, patched or rebuilt as needed."""
    signature = entries[0].signature
    stack = cache.get(signature)
    positions = None if stack is None else stack.positions(entries)
    if stack is None or positions is None:
        stack = cache[signature] = AdapterStack(entries)
        positions = list(range(len(entries)))
    return stack, positions
