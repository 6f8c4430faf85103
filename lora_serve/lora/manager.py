"""The residency manager: device memory, pins, merging and each step's LoRA batch. Engine thread.

It builds the engine's adapter side: the slot tables and device memory (residency.py), and the
catalog (catalog.py), which is the door every other thread uses. A running sequence pins its
adapter's residency; pinned adapters are never evicted. When no room can be made, a sequence for
another adapter waits in the queue (the scheduler lets later requests whose adapter is resident
go ahead, at most max_lora_bypass of them, then admits nothing behind it, so it gets the next
room that frees up). Merges and pins take the catalog's lock, which CPU evictions (request
threads) hold when they drop an adapter's shared entries.
"""

from __future__ import annotations

import logging

import torch

from ..config import LoRAConfig
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from ..model.loader import torch_dtype
from .budget import LoRAMemory
from .catalog import AdapterCatalog, AdapterLease
from .composition import ComposedLeases
from .errors import AdapterError, AdapterNotFoundError, QuantizedBaseError
from .merge import MergedWeights, quantized_base_message
from .ops.selector import lora_batch_class
from .residency import LoRASequence, Residency, Seq
from .slot_writes import SlotWriter

log = logging.getLogger(__name__)


class LoRAManager:
    """config: resolved (engine/resolve.py): its backend, slot dtype, budget and adapter_dir are concrete."""

    def __init__(self, model: LlamaModel, config: LoRAConfig, base_name: str):
        self.config = config
        self.max_loras = config.max_loras
        self.merged = MergedWeights(model)
        self.batch_cls = lora_batch_class(config.lora_backend)
        self.slot_dtype = torch_dtype(config.lora_dtype)
        read_by_kernels = model.kernels is not None and config.lora_backend == "torch"  # model/cpu_kernels.py
        self.slot_writer = SlotWriter(model.device, self.slot_dtype, read_by_kernels)  # side-stream copies from pinned memory on CUDA
        self.memory = LoRAMemory.of(config, model, self.slot_dtype)
        # Shared residency counts no device bytes (bytes_of is 0): the budget binds the CPU tier instead.
        self.residency = Residency(model, self.slot_dtype, self.memory.budget_bytes, config.max_loras, self.slot_writer)
        narrowest = min((model.dtype, self.slot_dtype), key=lambda d: torch.finfo(d).max)
        base_params = model.num_params()
        self.catalog = AdapterCatalog(
            model.arch, config, base_name, base_params, self.residency, self.memory, self.slot_writer, narrowest, self.merged
        )
        self.memory.log()

    # --- merged mode (between steps) -------------------------------------------------------------

    def merge(self, lease: AdapterLease, auto: bool = False) -> None:
        """Fold the leased adapter into the base weights (unmerging any other first); the merge holds
        its own reference on the CPU copy until unmerge(). auto: the merge policy's choice, refused
        unless the adapter is marked auto_merge."""
        name, catalog = lease.name, self.catalog
        if self.merged.model.quantization is not None:
            raise QuantizedBaseError(quantized_base_message(self.merged.model.quantization), param="name")
        with catalog.lock:
            if self.merged.name == name:
                return
            model = catalog.cpu_copy(name)
            if model is None or catalog.registry.find(name) is not lease.record:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="name")
            if auto and not lease.record.auto_merge:
                raise AdapterError(f"adapter {name!r} is not marked auto_merge", param="auto_merge")
            self.unmerge()
            catalog.hold(name)
            self.merged.merge(model)
            self.residency.set_merged(model)
            catalog.merged_name = name
            catalog.num_merges += 1
        log.info("merged adapter %s into the base weights", name)

    def unmerge(self) -> None:
        """Restore the base weights bit for bit (no-op when nothing is merged)."""
        with self.catalog.lock:
            name = self.merged.name
            if name is None:
                return
            self.merged.unmerge()
            self.residency.set_merged(None)
            self.catalog.merged_name = None
            self.catalog.release(name)
        log.info("unmerged adapter %s", name)

    # --- CPU -> device (engine thread) ----------------------------------------------------------

    def is_resident(self, name: str) -> bool:
        """Admitting a request on `name` now adds no adapter to what the device holds (the scheduler
        prefers such requests). Copied residency: on the device; shared (CPU): in the running batch,
        as every CPU copy is readable there but each distinct adapter adds bytes to every decode step."""
        with self.catalog.lock:
            return self.residency.is_resident(name)

    def adapter_bytes(self, name: str) -> int:
        """Bytes a decode step reads for `name` when it is in the batch: its A and B at their exact ranks."""
        return self.catalog.get(name).num_params * self.slot_dtype.itemsize

    def try_admit(self, seq: LoRASequence) -> bool:
        """Pin seq's adapter on the device (a composition's: every one of them, or none); False if no room
        can be made for it this step."""
        if seq.composed is not None:
            return self._admit_composed(seq.composed)
        name = seq.lora_name
        if name is None:
            return True
        # The registration the request opened: an adapter deleted while its requests wait still serves them.
        owner = seq.lease.record if seq.lease is not None else self.catalog.get(name)
        with self.catalog.lock:
            model = self.catalog.cpu_copy(name)  # held there by the request's lease
            slot = None if model is None else self.residency.pin(name, model, owner)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _admit_composed(self, composed: ComposedLeases) -> bool:
        slots: list[int] = []
        with self.catalog.lock:
            for lease, (name, weight) in zip(composed.leases, composed.composition.weights):
                model = self.catalog.cpu_copy(name)  # held there by the lease
                slot = None if model is None else self.residency.pin_scaled(name, model, lease.record, weight)
                if slot is None:  # all or none: a half-pinned composition would hold slots it cannot use
                    for (pinned, w), _ in zip(composed.composition.weights, slots):
                        self.residency.unpin_scaled(pinned, w)
                    return False
                slots.append(slot)
        composed.slots = slots
        return True

    def release_slot(self, seq: LoRASequence) -> None:
        composed = seq.composed
        if composed is not None and composed.slots is not None:
            with self.catalog.lock:
                for name, weight in composed.composition.weights:
                    self.residency.unpin_scaled(name, weight)
                composed.slots = None
            return
        if seq.lora_name is None or seq.lora_slot is None:
            return
        with self.catalog.lock:
            self.residency.unpin(seq.lora_name)
            seq.lora_slot = None

    def prepare(self, seqs: list[Seq], num_new_tokens: list[int]) -> LoRABatch | None:
        """The step's LoRA batch (residency.py), the batch ordered by adapter in place."""
        return self.residency.prepare(seqs, num_new_tokens, self.merged.name, self.batch_cls)
