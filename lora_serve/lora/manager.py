"""The two cache tiers of adapters and the per-step LoRA batch.

disk (registry)  --acquire(), any thread, blocking I/O-->  CPU (LRU, max_cpu_loras)
CPU              --try_admit(), engine thread, a copy-->  device slots (LRU, max_loras)

A request holds a reference on its adapter's CPU copy from `acquire` to `release`
(the API does both around the request), so an adapter in use is never dropped from
CPU. A running sequence pins its device slot; pinned slots are never evicted. When
every slot is pinned, a sequence for another adapter waits in the queue (the
scheduler lets later requests whose adapter is resident go ahead, and retries the
waiting one first at every step, so it gets the next slot that frees up).
Reading from disk never happens on the engine thread, so decoding goes on while an
adapter loads. Replicas may share adapter_dir: `sync_with_adapter_dir` registers a folder
another replica stored and unregisters one it deleted, on the next request naming it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..config import LoRAConfig
from ..engine.sequence import Sequence
from ..model.default_model import cache_root
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .errors import AdapterError, AdapterExistsError, AdapterNotFoundError
from .lora_model import CONFIG_FILE, LoRAModel, LoRAWeights
from .merge import MergedWeights, negated
from .registry import AdapterRecord, AdapterRegistry, check_name
from .slots import ProjectionSlots, resolve_lora_dtype
from .backend import lora_batch_class
from .slot_writes import SlotWriter

log = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: LlamaModel, config: LoRAConfig, base_name: str):
        self.config = config
        self.max_loras = config.max_loras
        self.registry = AdapterRegistry(model.arch, config.max_lora_rank, base_name)
        # Where uploads are stored and which folder is scanned at start.
        self.adapter_dir = config.adapter_dir or cache_root() / "adapters"
        self._lock = threading.RLock()
        self._cpu: OrderedDict[str, LoRAModel] = OrderedDict()  # LRU order, oldest first
        self._refs: dict[str, int] = {}  # in-flight requests per adapter
        self._slot_names: list[str | None] = [None] * config.max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(config.max_loras))
        self._pins = [0] * config.max_loras
        self.num_loads = 0
        self.num_evictions = 0
        self.num_merges = 0
        self.load_seconds = 0.0
        self.merged = MergedWeights(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        self.batch_cls = lora_batch_class(model.device, config.lora_backend)
        self.slot_writer = SlotWriter(model.device)  # side-stream copies from pinned memory on CUDA
        self.unmerge_slot = config.max_loras  # one extra slot: the merged adapter, negated (see merge.py)
        self.slot_dtype = resolve_lora_dtype(config.lora_dtype, model.device, model.dtype)
        log.info("LoRA slots: %d of rank %d in %s", config.max_loras, config.max_lora_rank, self.slot_dtype)
        # [(layer, slice names, slots)] for every projection; slots are filled per adapter.
        self._projections: list[tuple[int, tuple[str, ...], ProjectionSlots]] = []
        for i, layer in enumerate(model.layers):
            for linear in layer.linears():
                slots = ProjectionSlots(linear, config.max_loras + 1, config.max_lora_rank, model.device, self.slot_dtype)
                linear.lora_slots = slots
                self._projections.append((i, linear.slice_names, slots))

    # --- registry ------------------------------------------------------------------------------

    def register(self, name: str, path, origin: str, model: LoRAModel | None = None) -> AdapterRecord:
        # Before validation: a folder replaced after this stat is caught (and read again) on its next use.
        folder_id = _folder_id(path) if self._in_adapter_dir(path) else None
        record, loaded = self.registry.add(name, path, origin, model, folder_id)
        loaded = self.slot_writer.host_copy(loaded)
        log.info(
            "adapter %s (%s): rank %s on %s, %.2fM params = %.3f%% of the base's, %.1f MB",
            name, origin, "/".join(map(str, record.ranks)), ",".join(record.targets),
            record.num_params / 1e6, 100 * record.num_params / self.base_params, record.num_bytes / 1e6,
        )
        with self._lock:
            self._cpu[name] = loaded
            self._evict_cpu()
        return record

    def register_startup_adapters(self) -> None:
        """--lora-modules (a bad one stops the start) and every sub-folder of --adapter-dir
        (a bad one is logged and skipped, so one broken upload cannot keep the server down)."""
        for spec in self.config.lora_modules:
            name, _, path = spec.partition("=")
            self.register(name, Path(path), "lora-modules")
        folder = self.adapter_dir
        if not folder.is_dir():
            return
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and not self.registry.contains(sub.name):
                try:
                    self.register(sub.name, sub, "adapter-dir")
                except AdapterError as exc:
                    log.error("skipping adapter folder %s: %s", sub, exc)

    # --- adapter_dir, shared with other replicas (blocking I/O) ------------------------------------

    def sync_with_adapter_dir(self, name: str) -> bool:
        """Bring `name` in line with adapter_dir, which other replicas sharing it change; True if it
        is registered afterwards. One stat when nothing changed. Registered from a folder of
        adapter_dir that is gone or was replaced since (another replica deleted it, or deleted and
        uploaded it again): unregistered, requests running on it finishing first. Not registered:
        adapter_dir/<name> is registered if it is there (resolve_from_adapter_dir)."""
        try:
            record = self.registry.get(name)
        except AdapterNotFoundError:
            return self.resolve_from_adapter_dir(name)
        if record.folder_id is None or _folder_id(record.path) == record.folder_id:
            return True
        self._unregister_stale(record)
        # A replaced folder is read again, once the old copy's requests are done (until then: 404).
        return self.resolve_from_adapter_dir(name)

    def drop_removed(self) -> list[str]:
        """Unregister every adapter whose adapter_dir folder is gone or was replaced; their names.
        Called before listing, so that a list shows no adapter another replica deleted."""
        stale = [r for r in self.registry.list() if r.folder_id is not None and _folder_id(r.path) != r.folder_id]
        for record in stale:
            self._unregister_stale(record)
        return [r.name for r in stale]

    def _unregister_stale(self, record: AdapterRecord) -> None:
        try:
            if self.registry.get(record.name) is not record:
                return  # registered again meanwhile, from the new folder
            log.info("adapter %s: %s was removed or replaced; unregistering it", record.name, record.path)
            self.unregister(record.name)
        except AdapterNotFoundError:
            pass  # a concurrent request unregistered it first

    def _in_adapter_dir(self, path) -> bool:
        return Path(os.path.realpath(path)).parent == Path(os.path.realpath(self.adapter_dir))

    def resolve_from_adapter_dir(self, name: str) -> bool:
        """Register adapter_dir/<name> on first use if it appeared after the start-up scan (another
        replica sharing the folder stored it, as vLLM's filesystem resolver does). True if `name` is
        registered afterwards. Only a direct child that is not a dot-folder; blocking I/O."""
        if self.registry.contains(name):
            return True
        try:
            check_name(name, self.registry.base_name)
        except AdapterError:
            return False
        root = Path(os.path.realpath(self.adapter_dir))
        path = Path(os.path.realpath(root / name))
        if name.startswith(".") or path.parent != root or path.name != name or not (path / CONFIG_FILE).is_file():
            return False
        try:
            self.register(name, path, "adapter-dir")
        except AdapterExistsError:  # a concurrent request registered it first, or it is being deleted
            return self.registry.contains(name)
        except AdapterError as exc:
            log.warning("not resolving adapter folder %s: %s", path, exc)
            return False
        return True

    def unregister(self, name: str) -> None:
        """Refuse new requests at once; drop the weights when the in-flight ones have finished.
        A merged adapter stays merged until then (call from the engine thread to unmerge first)."""
        record = self.registry.get(name)
        record.deleting = True
        with self._lock:
            if self._refs.get(name, 0) == 0:
                self._purge(name)

    # --- merged mode (engine thread, between steps) ----------------------------------------------

    def merge(self, name: str) -> None:
        """Fold `name` into the base weights (unmerging any other first). It must be CPU-resident:
        call acquire(name) first; the merge holds its own reference until unmerge()."""
        with self._lock:
            if self.merged.name == name:
                return
            model = self._cpu.get(name)
            if model is None or not self.registry.contains(name):
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="name")
            self.unmerge()
            self._refs[name] = self._refs.get(name, 0) + 1
            self.merged.merge(model)
            self._fill_slot(self.unmerge_slot, f"-{name}", dict(negated(model)))
            self.num_merges += 1
        log.info("merged adapter %s into the base weights", name)

    def unmerge(self) -> None:
        """Restore the base weights bit for bit (no-op when nothing is merged)."""
        with self._lock:
            name = self.merged.name
            if name is None:
                return
            self.merged.unmerge()
            self._clear_slot(self.unmerge_slot)
            self.release(name)
        log.info("unmerged adapter %s", name)

    def location(self, name: str) -> str:
        with self._lock:
            if name in self._slot_names:
                return "device"
            return "cpu" if name in self._cpu else "disk"

    # --- disk -> CPU (request threads) -----------------------------------------------------------

    def acquire(self, name: str) -> None:
        """Make `name` CPU-resident and hold it there until `release(name)`. Blocking I/O."""
        record = self.registry.get(name)
        with self._lock:
            self._refs[name] = self._refs.get(name, 0) + 1
            record.requests_served += 1
            if name in self._cpu:
                self._cpu.move_to_end(name)
                return
        start = time.perf_counter()
        try:
            loaded = self.slot_writer.host_copy(LoRAModel.load(name, record.path, self.registry.arch, self.config.max_lora_rank))
        except Exception:
            self.release(name)
            raise
        with self._lock:
            self._cpu[name] = loaded
            self.num_loads += 1
            self.load_seconds += time.perf_counter() - start
            self._evict_cpu()

    def num_refs(self, name: str) -> int:
        """References held on `name`: requests in flight on it, plus one while it is merged."""
        with self._lock:
            return self._refs.get(name, 0)

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] == 0:
                del self._refs[name]
                if not self.registry.contains(name):
                    self._purge(name)
                else:
                    self._evict_cpu()  # back under max_cpu_loras once the overflow is no longer in use

    def _evict_cpu(self) -> None:
        # Evict least recently used adapters no request holds; those in use may exceed the cap.
        for name in list(self._cpu):
            if len(self._cpu) <= self.config.cpu_capacity:
                break
            if self._refs.get(name, 0) == 0:
                del self._cpu[name]
                self.num_evictions += 1

    def _purge(self, name: str) -> None:
        self._cpu.pop(name, None)
        if name in self._slot_names:
            slot = self._slot_names.index(name)
            if self._pins[slot] == 0:
                self._clear_slot(slot)
        self.registry.remove(name)

    # --- CPU -> device slots (engine thread) ----------------------------------------------------

    def try_admit(self, seq: Sequence) -> bool:
        """Pin a device slot holding seq's adapter; False if none can be had this step."""
        name = seq.lora_name
        if name is None:
            return True
        with self._lock:
            if name in self._slot_names:
                slot = self._slot_names.index(name)
            else:
                weights = self._cpu.get(name)
                slot = next((s for s in self._slot_lru if self._pins[s] == 0), None)
                if weights is None or slot is None:
                    return False
                self._fill_slot(slot, name, weights.weights)
            self._pins[slot] += 1
            self._slot_lru.move_to_end(slot)
            seq.lora_slot = slot
            return True

    def release_slot(self, seq: Sequence) -> None:
        if seq.lora_name is None or seq.lora_slot is None:
            return
        with self._lock:
            self._pins[seq.lora_slot] -= 1
            seq.lora_slot = None

    def _fill_slot(self, slot: int, name: str, weights: dict[tuple[int, str], LoRAWeights]) -> None:
        if slot < self.max_loras and self._slot_names[slot] is not None:
            self.num_evictions += 1
        with self.slot_writer.writing():
            for layer, names, slots in self._projections:
                slots.fill(slot, [weights.get((layer, n)) for n in names])
                self.slot_writer.mark_written(slots)
        if slot < self.max_loras:
            self._slot_names[slot] = name
        log.info("adapter %s -> device slot %d", name, slot)

    def _clear_slot(self, slot: int) -> None:
        with self.slot_writer.writing():
            for _, _, slots in self._projections:
                slots.clear(slot)
                self.slot_writer.mark_written(slots)
        if slot < self.max_loras:
            self._slot_names[slot] = None

    # --- per step -------------------------------------------------------------------------------

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> LoRABatch | None:
        """Order the batch in place and build its segments. Rows: adapters by slot, then base-only,
        then the merged adapter's. Base-only rows get no delta at all; while an adapter is merged,
        every row before its own gets the negated merged adapter (one extra segment)."""
        merged = self.merged.name
        if merged is None and all(s.lora_slot is None for s in seqs):
            return None

        def group(i: int) -> tuple[int, int]:
            s = seqs[i]
            if merged is not None and s.lora_name == merged:
                return (2, 0)
            return (1, 0) if s.lora_slot is None else (0, s.lora_slot)

        order = sorted(range(len(seqs)), key=group)
        groups = [group(i) for i in order]
        seqs[:] = [seqs[i] for i in order]
        num_new_tokens[:] = [num_new_tokens[i] for i in order]
        segments: list[tuple[int, int, int]] = []
        row = 0
        for (kind, slot), n in zip(groups, num_new_tokens):
            if kind == 2:
                break
            if kind == 0:
                if segments and segments[-1][0] == slot and segments[-1][2] == row:
                    segments[-1] = (slot, segments[-1][1], row + n)
                else:
                    segments.append((slot, row, row + n))
            row += n
        if merged is not None and row > 0:
            segments.append((self.unmerge_slot, 0, row))
        return self.batch_cls(segments) if segments else None  # merged-only batches run the bare base path


def _folder_id(path) -> tuple[int, int, int] | None:
    """(device, inode, change time in ns) of a folder, None when it is gone. A folder renamed into
    its place (how an upload lands, see store.py) is another folder even where the file system
    hands the deleted one's inode number out again (ext4 does, at once): its change time differs.
    A stored adapter's folder is never written to after that rename, so its ctime stays put."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns
