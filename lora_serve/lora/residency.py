"""Which adapters the LoRA matmuls can read now, in how many bytes, and each step's LoRA batch.

An adapter is resident when every projection's slot table (slots.py) points at its weights. Two
ways, chosen once per engine:
- shared (CPU, float32 or float16 slots): the device is the CPU, so the entries are views of the
  CPU tier's own copy (LoRAModel.packed, kept in the slots' dtype: slot_writes.py) and residency
  costs no second copy. An entry lives
  as long as that copy: the CPU tier (its byte budget and LRU, manager.py) decides which adapters
  stay in memory, drops an adapter's entry with its copy, and never drops a copy a request holds.
- copied (CUDA, or bfloat16 slots on CPU): one device buffer per adapter, exactly its ranks'
  bytes, copied from the CPU tier in one transfer (from pinned memory, on a side stream: see
  slot_writes.py). The buffers share a byte budget (LoRAConfig.lora_memory_gb); unpinned ones
  stay for reuse and are evicted least recently used first when a new adapter needs room.
max_loras, when set, caps the resident adapters in either way (vLLM's meaning: the most one batch mixes).
A composed request's components (composition.py) count as the distinct adapters they are: an adapter
at a weight other than 1.0 is a virtual slot, an entry viewing the adapter's own resident tensors with
its scales times the weight, holding no memory and not counted; it lives while a running row uses it.
Engine thread only, but for `drop`, which the manager calls under its lock, and `prepare_copy`,
which the threads that load adapters call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import torch

from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .composition import ComposedLeases
from .lora_model import LoRAModel
from .merge import negated
from .registry import AdapterRecord
from .slot_writes import SlotWriter, shares_cpu_copy
from .slots import ProjectionSlots, SlotEntry

log = logging.getLogger(__name__)


class LoRASequence(Protocol):
    """What the LoRA layer reads and sets on a sequence (the engine's Sequence, which lora/ does not import)."""

    lora_name: str | None  # its adapter, None for the base model
    lora_slot: int | None  # that adapter's slot, set while the sequence pins it (running)
    composed: ComposedLeases | None  # its adapters and weights instead of lora_name (composition.py)

    @property
    def lease(self) -> Lease | None: ...  # its hold on the adapter's CPU copy (catalog.AdapterLease)


class Lease(Protocol):
    @property
    def record(self) -> AdapterRecord: ...  # the registration it was opened on


Seq = TypeVar("Seq", bound=LoRASequence)


@dataclass(eq=False)
class _Resident:
    owner: object  # the registration it belongs to: an entry of an earlier registration of the name is refilled
    slot: int
    num_bytes: int  # device bytes it holds (0 when shared with the CPU tier)
    buffer: torch.Tensor | None  # the device copy (copied mode); shared: the entries' views hold the CPU copy
    pins: int = 0


@dataclass(frozen=True, eq=False)
class PreparedEntries:
    """A shared CPU copy's entries, built as it was loaded (Residency.prepare_copy)."""

    weights: dict  # the LoRAModel's weights they were built from (a copy by dataclasses.replace may carry others)
    entries: list[SlotEntry | None]  # per projection, in Residency.projections' order; None: not targeted


@dataclass(eq=False)
class _Virtual:
    slot: int
    pins: int = 0


class Residency:
    def __init__(self, model: LlamaModel, dtype: torch.dtype, budget_bytes: int, max_loras: int | None, writer: SlotWriter):
        self.dtype = dtype
        self.device = model.device
        self.shared = shares_cpu_copy(model.device, dtype)
        self.budget_bytes = budget_bytes
        self.max_loras = max_loras
        self.writer = writer
        self.bytes_used = 0
        self.num_evictions = 0
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order, oldest first
        self._merged: _Resident | None = None  # the merged adapter's negation (merge.py), pinned while merged
        self._virtual: dict[tuple[str, float], _Virtual] = {}  # (adapter, weight) -> its scaled view, while pinned
        self._free_slots: list[int] = []
        self._num_slots = 0
        # [(layer, slice names, slots)] for every projection, in the base's order.
        self.projections: list[tuple[int, tuple[str, ...], ProjectionSlots]] = []
        for i, layer in enumerate(model.layers):
            for linear in layer.linears():
                slots = ProjectionSlots(linear, model.device, dtype, linear.kernels if writer.b_transposed else None)
                linear.lora_slots = slots
                self.projections.append((i, linear.slice_names, slots))

    @property
    def layout(self) -> list[tuple[int, tuple[str, ...]]]:
        """(layer, slice names) of every projection: how LoRAModel.packed lays an adapter out."""
        return [(layer, names) for layer, names, _ in self.projections]

    def bytes_of(self, model: LoRAModel) -> int:
        """Device bytes the adapter takes when resident (0 when it would share the CPU tier's copy)."""
        return 0 if self.shared else model.num_params * self.dtype.itemsize

    def is_resident(self, name: str) -> bool:
        """Admitting `name` adds no adapter to what a step reads: on the device (copied), or in the running
        batch (shared, where every CPU copy is readable but each distinct adapter adds bytes to a step)."""
        entry = self._resident.get(name)
        return entry is not None and (not self.shared or entry.pins > 0)

    def names(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def num_pins(self) -> int:
        return sum(e.pins for e in self._resident.values())

    # --- pins (engine thread) ------------------------------------------------------------------

    def pin(self, name: str, model: LoRAModel, owner: object) -> int | None:
        """The slot holding `model` (filled now if need be), pinned until `unpin`; None when no room can
        be made this step (every other resident adapter is pinned, or max_loras of them are). owner: the
        registration (AdapterRecord); a copy re-read from disk for the same one is the same weights."""
        entry = self._resident.get(name)
        if entry is not None and entry.owner is not owner:
            if entry.pins:
                return None  # an earlier registration's sequences still run (they finish before a new one is added)
            self.drop(name)
            entry = None
        if entry is None:
            entry = self._make_room_and_fill(name, model, owner)
            if entry is None:
                return None
        entry.pins += 1
        self._resident.move_to_end(name)
        return entry.slot

    def unpin(self, name: str) -> None:
        self._resident[name].pins -= 1

    def pin_scaled(self, name: str, model: LoRAModel, owner: object, weight: float) -> int | None:
        """As `pin`, for one component of a composition: the slot of `name` at `weight` (its own at 1.0,
        else a virtual slot made now if no running row has it), pinned until `unpin_scaled`."""
        slot = self.pin(name, model, owner)
        if slot is None or weight == 1.0:
            return slot
        virtual = self._virtual.get((name, weight))
        if virtual is None:
            virtual = self._virtual[(name, weight)] = _Virtual(self._free_slots.pop() if self._free_slots else self._new_slot())
            with self.writer.writing():  # CUDA: after the source's own writes, on the same side stream
                for _, _, slots in self.projections:
                    slots.fill_scaled(virtual.slot, slot, weight)
                    self.writer.mark_written(slots)
        virtual.pins += 1
        return virtual.slot

    def unpin_scaled(self, name: str, weight: float) -> None:
        self.unpin(name)
        virtual = self._virtual.get((name, weight))
        if virtual is None:
            return
        virtual.pins -= 1
        if virtual.pins == 0:  # no running row reads it: free the slot (the adapter itself stays resident)
            del self._virtual[(name, weight)]
            for _, _, slots in self.projections:
                slots.clear(virtual.slot)
            self._free_slots.append(virtual.slot)

    def num_virtual(self) -> int:
        """Virtual slots in use (composition components at a weight other than 1.0)."""
        return len(self._virtual)

    def drop(self, name: str) -> None:
        """Forget `name`'s entry and free its memory, unless a running sequence pins it."""
        entry = self._resident.get(name)
        if entry is None or entry.pins:
            return
        del self._resident[name]
        self._release(entry)

    def _make_room_and_fill(self, name: str, model: LoRAModel, owner: object) -> _Resident | None:
        need = self.bytes_of(model)
        while (self.max_loras is not None and len(self._resident) >= self.max_loras) or self.bytes_used + need > self.budget_bytes:
            victim = next((n for n, e in self._resident.items() if e.pins == 0), None)
            if victim is None:
                return None
            self.drop(victim)
            self.num_evictions += 1
        entry = self._fill(model, need, owner)
        self._resident[name] = entry
        if not self.shared:  # shared: views made in microseconds, not worth a line each
            log.info("adapter %s resident in slot %d (%.1f MB on %s)", name, entry.slot, need / 1e6, self.device.type)
        return entry

    # --- merged mode ----------------------------------------------------------------------------

    def set_merged(self, model: LoRAModel | None) -> int | None:
        """Point a slot at the negation of the merged adapter (None: clear it); its slot. Over budget
        if it must be: a merge is an operator's decision, not a request that could wait."""
        if self._merged is not None:
            self._release(self._merged)
            self._merged = None
        if model is None:
            return None
        neg = replace(model, weights=dict(negated(model)))
        self._merged = self._fill(neg, self.bytes_of(model), None)
        return self._merged.slot

    # --- filling --------------------------------------------------------------------------------

    def prepare_copy(self, model: LoRAModel) -> LoRAModel:
        """Shared: build the entries of `model`, a CPU-tier copy (LoRAModel.packed), now, on the thread
        that loads it, so that making it resident only points the slots at them. Built at `pin`, they
        took ~10 ms of Python on the engine thread for a rank-16 all-linear adapter (120 projections),
        while every stream waited. Reads nothing that changes: any thread may call it."""
        if self.shared and model.flat is not None:
            model.prepared = PreparedEntries(model.weights, self._entries(model, model.flat))
        return model

    def _fill(self, model: LoRAModel, num_bytes: int, owner: object) -> _Resident:
        assert model.flat is not None, "the CPU tier keeps adapters packed (LoRAModel.packed)"
        slot = self._free_slots.pop() if self._free_slots else self._new_slot()
        # Allocated on the step's stream, so that once freed the memory is not reused before the steps
        # that read it are done; only the copy runs on the side stream.
        buffer = None if self.shared else torch.empty(model.flat.numel(), dtype=self.dtype, device=self.device)
        with self.writer.writing():
            if buffer is None:
                prepared = model.prepared
                if isinstance(prepared, PreparedEntries) and prepared.weights is model.weights:
                    entries = prepared.entries
                else:  # not loaded through the CPU tier, or a copy of it with other weights (a merge's negation)
                    entries = self._entries(model, model.flat)
            else:  # one transfer of the whole adapter (converting on the device when the dtype differs)
                entries = self._entries(model, buffer.copy_(model.flat, non_blocking=True))
            for (_, _, slots), entry in zip(self.projections, entries):
                slots.put(slot, entry)
                if entry is not None:
                    self.writer.mark_written(slots)
        self.bytes_used += num_bytes
        return _Resident(owner, slot, num_bytes, buffer)

    def _entries(self, model: LoRAModel, flat: torch.Tensor) -> list[SlotEntry | None]:
        """Per projection, the entry viewing `flat` (model.flat or its device copy); None where not targeted."""
        entries: list[SlotEntry | None] = []
        for layer, names, slots in self.projections:
            weights = [model.weights.get((layer, n)) for n in names]
            targeted = [w for w in weights if w is not None]
            if not targeted:
                entries.append(None)
                continue
            views = [None if w is None else replace(w, A=_view(flat, model, w.A), B=_view(flat, model, w.B)) for w in weights]
            start = model.flat_offset(targeted[0].A)
            rows = sum(w.A.shape[0] for w in targeted)
            entries.append(slots.entry(views, flat[start : start + rows * targeted[0].A.shape[1]].view(rows, -1)))
        return entries

    def _release(self, entry: _Resident) -> None:
        for _, _, slots in self.projections:
            slots.clear(entry.slot)
        self._free_slots.append(entry.slot)
        self.bytes_used -= entry.num_bytes

    def _new_slot(self) -> int:
        self._num_slots += 1
        return self._num_slots - 1

    # --- per step -------------------------------------------------------------------------------

    def prepare(self, seqs: list[Seq], num_new_tokens: list[int], merged: str | None, batch_cls: type) -> LoRABatch | None:
        """Order the batch in place and build its segments. Rows: adapters by slot, then compositions
        (each distinct one a run, each component one segment over it), then base-only, then the merged
        adapter's. Base-only rows get no delta at all; while an adapter is merged, every row before its
        own gets the negated merged adapter (one extra segment)."""
        if merged is None and all(s.lora_slot is None and s.composed is None for s in seqs):
            return None

        def group(i: int) -> tuple[int, tuple[int, ...]]:
            s = seqs[i]
            if merged is not None and s.lora_name == merged:
                return (3, ())
            if s.composed is not None and s.composed.slots is not None:
                return (1, tuple(s.composed.slots))
            return (2, ()) if s.lora_slot is None else (0, (s.lora_slot,))

        order = sorted(range(len(seqs)), key=group)
        groups = [group(i) for i in order]
        seqs[:] = [seqs[i] for i in order]
        num_new_tokens[:] = [num_new_tokens[i] for i in order]
        runs: list[tuple[tuple[int, tuple[int, ...]], int, int]] = []  # (group, lo, hi): rows of one adapter or composition
        row = 0
        for key, n in zip(groups, num_new_tokens):
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], row + n)
            else:
                runs.append((key, row, row + n))
            row += n
        segments = [(slot, lo, hi) for (kind, slots), lo, hi in runs if kind < 2 for slot in slots]
        unmerged_rows = next((lo for (kind, _), lo, _ in runs if kind == 3), row)
        if self._merged is not None and unmerged_rows > 0:
            segments.append((self._merged.slot, 0, unmerged_rows))
        return batch_cls(segments) if segments else None  # merged-only batches run the bare base path


def _view(flat: torch.Tensor, model: LoRAModel, t: torch.Tensor) -> torch.Tensor:
    """The tensor of `flat` (model.flat or its device copy) at the place, and with the strides, `t` has in model.flat."""
    return flat.as_strided(t.shape, t.stride(), flat.storage_offset() + model.flat_offset(t))
