"""The two cache tiers of adapters and the per-step LoRA batch.

disk (registry)  --acquire(), any thread, blocking I/O-->  CPU (LRU, max_cpu_loras, bytes)
CPU              --try_admit(), engine thread-->  device (residency.py: LRU in a byte budget)

A request holds a reference on its adapter's CPU copy from `acquire` to `release`
(the API does both around the request), so an adapter in use is never dropped from
CPU. max_cpu_loras is a hard bound on the copies held (and being read) at once: when
they are all in use, `acquire` for another adapter waits until a request releases
one. That always comes: the CPU tier holds at least as many adapters as the device, so the
requests holding copies run (or wait for device room that running ones free) and finish. Serving
on CPU, the CPU tier is the device memory (residency.py): lora_memory_gb bounds its bytes. The merged
adapter's copy is counted apart, as its negated copy has a slot of its own; at most
one copy more is resident meanwhile, and it is not held by a request that could wait.
A running sequence pins its adapter's residency; pinned adapters are never evicted. When
no room can be made, a sequence for another adapter waits in the queue (the
scheduler lets later requests whose adapter is resident go ahead, at most
max_lora_bypass of them, then admits nothing behind it, so it gets the next room that frees up).
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

import torch

from ..config import LoRAConfig
from ..model.default_model import cache_root
from ..model.linear import LoRABatch
from ..model.llama import LlamaModel
from .budget import LoRAMemory
from .errors import (
    AdapterBusyError,
    AdapterError,
    AdapterExistsError,
    AdapterMergedError,
    AdapterNotFoundError,
    AdapterTooLargeError,
)
from .lora_model import CONFIG_FILE, LoRAModel
from .merge import MergedWeights
from .ops.selector import lora_batch_class
from .registry import AdapterRecord, AdapterRegistry, check_name
from .residency import LoRASequence, Residency, Seq
from .slot_writes import SlotWriter
from .slots import resolve_lora_dtype
from .store import read_owner

log = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: LlamaModel, config: LoRAConfig, base_name: str):
        self.config = config
        self.max_loras = config.max_loras
        # Where uploads are stored and which folder is scanned at start.
        self.adapter_dir = config.adapter_dir or cache_root() / "adapters"
        # Where the load API may read from: the adapter's folder and, on every read, each of its files.
        self.allowed_dirs = tuple(Path(os.path.realpath(d)) for d in config.allowed_lora_dir)
        self._lock = threading.RLock()
        self._cpu_freed = threading.Condition(self._lock)  # notified when a CPU copy may have become evictable
        self._cpu: OrderedDict[str, LoRAModel] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, int] = {}  # being read from disk by acquire(), with their bytes: each holds a place
        self._refs: dict[str, int] = {}  # in-flight requests per adapter (those waiting for a CPU place too)
        self.peak_cpu_loras = 0  # most CPU places taken at once (copies + reads), for tests and metrics
        self.num_loads = 0  # adapters read from disk into CPU memory: at registration, and again after eviction
        self.num_evictions = 0
        self.num_merges = 0
        self.load_seconds = 0.0
        self.merged = MergedWeights(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        self.batch_cls = lora_batch_class(model.device, config.lora_backend)
        self.slot_writer = SlotWriter(model.device)  # side-stream copies from pinned memory on CUDA
        self.slot_dtype = resolve_lora_dtype(config.lora_dtype, model.device, model.dtype)
        # An adapter's update is checked against the narrower of the base's and the slots' dtypes.
        narrowest = min((model.dtype, self.slot_dtype), key=lambda d: torch.finfo(d).max)
        self.registry = AdapterRegistry(model.arch, config.max_lora_rank, base_name, narrowest)
        self.memory = LoRAMemory.resolve(config, model, self.slot_dtype)
        self.max_loras = config.max_loras
        # Shared residency counts no device bytes (bytes_of is 0): the budget binds the CPU tier instead.
        self.residency = Residency(model, self.slot_dtype, self.memory.budget_bytes, config.max_loras, self.slot_writer)
        self.memory.log()

    # --- registry ------------------------------------------------------------------------------

    def register(self, name: str, path, origin: str, model: LoRAModel | None = None) -> AdapterRecord:
        """auto_merge (may --merge-policy auto merge it) is set for an adapter of no tenant: from
        --lora-modules, the load API, or an adapter_dir folder without a .tenant file; a tenant's
        upload gets it only from an admin (registry.set_auto_merge): no tenant changes the base for all."""
        in_store = self._in_adapter_dir(path)
        # Before validation: a folder replaced after this stat is caught (and read again) on its next use.
        folder_id = _folder_id(path) if in_store else None
        auto_merge = not in_store or read_owner(path) is None
        model = model or self.read(name, path, origin)
        if 4 * model.num_params > self.memory.cpu_bytes:
            raise AdapterTooLargeError(
                f"adapter {name!r} needs {4 * model.num_params / 1e6:.0f} MB of CPU memory; the adapter memory "
                f"budget (lora_memory_gb) holds {self.memory.cpu_bytes / 1e6:.0f} MB",
                param="adapter_model",
            )
        record, loaded = self.registry.add(name, path, origin, model, folder_id, auto_merge)
        loaded = self.slot_writer.host_copy(loaded, self.residency.layout)
        log.info(
            "adapter %s (%s): rank %s on %s, %.2fM params = %.3f%% of the base's, %.1f MB",
            name,
            origin,
            "/".join(map(str, record.ranks)),
            ",".join(record.targets),
            record.num_params / 1e6,
            100 * record.num_params / self.base_params,
            record.num_bytes / 1e6,
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
            self.unregister(record.name, record=record)
        except AdapterNotFoundError:
            pass  # a concurrent request unregistered it first
        except AdapterMergedError:  # only the engine thread may unmerge; served as merged until then
            log.warning("adapter %s stays registered while it is merged; unmerge it to drop it", record.name)

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

    def unregister(self, name: str, unmerge: bool = False, record: AdapterRecord | None = None) -> None:
        """Refuse new requests at once; drop the weights when the in-flight ones have finished.
        A merged adapter is unmerged first with unmerge=True (engine thread only: it writes the base
        weights), else refused (AdapterMergedError). Checked and done under the lock merge() holds, so
        after a merge and an unregister of one adapter, in any order, either it is gone and the base
        unmerged, or it is merged and registered. record: only that registration of the name."""
        with self._lock:
            current = self.registry.find(name)
            if current is None or (record is not None and current is not record):
                raise AdapterNotFoundError(f"adapter {name!r} does not exist", param="name")
            if self.merged.name == name:
                if not unmerge:
                    raise AdapterMergedError(f"adapter {name!r} is merged into the base weights; unmerge it first", param="name")
                self.unmerge()
            current.deleting = True
            if self._refs.get(name, 0) == 0:
                self._purge(name)

    # --- merged mode (engine thread, between steps) ----------------------------------------------

    def merge(self, name: str, auto: bool = False) -> None:
        """Fold `name` into the base weights (unmerging any other first). It must be CPU-resident:
        call acquire(name) first; the merge holds its own reference until unmerge(). auto: the merge
        policy's choice, refused unless the adapter is marked auto_merge."""
        with self._lock:
            if self.merged.name == name:
                return
            model = self._cpu.get(name)
            if model is None or not self.registry.contains(name):
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="name")
            if auto and not self.registry.get(name).auto_merge:
                raise AdapterError(f"adapter {name!r} is not marked auto_merge", param="auto_merge")
            self.unmerge()
            self._refs[name] = self._refs.get(name, 0) + 1
            self.merged.merge(model)
            self.residency.set_merged(model)
            self.num_merges += 1
        log.info("merged adapter %s into the base weights", name)

    def unmerge(self) -> None:
        """Restore the base weights bit for bit (no-op when nothing is merged)."""
        with self._lock:
            name = self.merged.name
            if name is None:
                return
            self.merged.unmerge()
            self.residency.set_merged(None)
            self.release(name)
        log.info("unmerged adapter %s", name)

    def adapter_bytes(self, name: str) -> int:
        """Bytes a decode step reads for `name` when it is in the batch: its A and B at their exact ranks."""
        return self.registry.get(name).num_params * self.slot_dtype.itemsize

    def location(self, name: str) -> str:
        if self.residency.is_resident(name) or (self.residency.shared and name in self._cpu):
            return "device"  # shared: the CPU copy is what the matmuls read
        return "cpu" if name in self._cpu else "disk"

    def is_resident(self, name: str) -> bool:
        """Admitting a request on `name` now adds no adapter to what the device holds (the scheduler
        prefers such requests). Copied residency: on the device; shared (CPU): in the running batch,
        as every CPU copy is readable there but each distinct adapter adds bytes to every decode step."""
        with self._lock:
            return self.residency.is_resident(name)

    # --- disk -> CPU (request threads) -----------------------------------------------------------

    def acquire(self, name: str, wait_s: float | None = 0.0, abandoned: threading.Event | None = None) -> None:
        """Make `name` CPU-resident and hold it there until `release(name)`. Blocking I/O.

        While every CPU place is held by adapters in use, wait up to wait_s seconds (None: no limit)
        for a request to release one, or until `abandoned` is set (then call `abandon` to wake the
        wait); past that, AdapterBusyError (503). The engine thread must pass 0, as it is what releases.
        """
        record = self.registry.get(name)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        with self._cpu_freed:
            self._refs[name] = self._refs.get(name, 0) + 1
            record.requests_served += 1
            try:
                while not self._take_cpu_place(name):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if (remaining is not None and remaining <= 0) or (abandoned is not None and abandoned.is_set()):
                        raise AdapterBusyError(
                            f"adapter {name!r} cannot be loaded now: the CPU tier's room (lora_memory_gb, "
                            f"max_cpu_loras) is held by adapters in use",
                            param="model",
                        )
                    self._cpu_freed.wait(remaining)
                    if not self.registry.contains(name):
                        raise AdapterNotFoundError(f"adapter {name!r} does not exist", param="model")
            except BaseException:
                self.release(name)
                raise
            if name in self._cpu:
                return
            self._loading[name] = self._cpu_bytes_of(record)
            self.peak_cpu_loras = max(self.peak_cpu_loras, self._cpu_usage()[0])
        try:
            loaded = self.slot_writer.host_copy(self.read(name, record.path, record.origin), self.residency.layout)
        except BaseException:
            with self._cpu_freed:
                self._loading.pop(name, None)
                self._cpu_freed.notify_all()
                self.release(name)
            raise
        with self._cpu_freed:
            self._loading.pop(name, None)
            self._cpu[name] = loaded
            self._cpu_freed.notify_all()  # those waiting for this very adapter

    def read(self, name: str, path, origin: str) -> LoRAModel:
        """Read and validate an adapter folder (disk -> CPU), counted in num_loads and load_seconds;
        uploads call it on their staged folder. A load-API adapter's files must lie in allowed_dirs. Blocking."""
        start = time.perf_counter()
        model = self.registry.validate(name, path, self.allowed_dirs if origin == "load-api" else None)
        with self._lock:
            self.num_loads += 1
            self.load_seconds += time.perf_counter() - start
        return model

    def abandon(self, abandoned: threading.Event) -> None:
        """Set `abandoned` and wake the acquire() waiting with it, which then gives up (its request is gone)."""
        with self._cpu_freed:
            abandoned.set()
            self._cpu_freed.notify_all()

    def num_refs(self, name: str) -> int:
        """References held on `name`: requests in flight on it, plus one while it is merged."""
        with self._lock:
            return self._refs.get(name, 0)

    def release(self, name: str) -> None:
        with self._cpu_freed:
            self._refs[name] -= 1
            if self._refs[name] == 0:
                del self._refs[name]
                if not self.registry.contains(name):
                    self._purge(name)
                else:
                    self._evict_cpu()  # back under max_cpu_loras if a copy was registered over it
                self._cpu_freed.notify_all()

    def _take_cpu_place(self, name: str) -> bool:
        """True when `name` is resident (now most recently used) or room was freed for reading it;
        False while another thread reads it, or the room is held by adapters in use. Lock held."""
        if name in self._cpu:
            self._cpu.move_to_end(name)
            return True
        if name in self._loading:
            return False
        need = self._cpu_bytes_of(self.registry.get(name))
        while not self._cpu_fits(1, need):
            victim = next((n for n in self._cpu if self._refs.get(n, 0) == 0), None)
            if victim is None:
                return False
            del self._cpu[victim]
            if self.residency.shared:
                self.residency.drop(victim)  # its views would keep the copy alive
            self.num_evictions += 1
        return True

    def _cpu_usage(self) -> tuple[int, int]:
        """(places, bytes) the CPU tier holds: copies and reads in progress; the merged adapter's copy,
        held by merge(), never evicted and with a slot of its own, is not counted."""
        merged = self.merged.name
        held = [4 * m.num_params for n, m in self._cpu.items() if n != merged] + list(self._loading.values())
        return len(held), sum(held)

    def _cpu_fits(self, places: int, num_bytes: int) -> bool:
        taken, used = self._cpu_usage()
        limit = self.memory.max_cpu_loras
        return (limit is None or taken + places <= limit) and used + num_bytes <= self.memory.cpu_bytes

    @staticmethod
    def _cpu_bytes_of(record: AdapterRecord) -> int:
        return 4 * record.num_params  # CPU copies are float32

    def _evict_cpu(self) -> None:
        # Evict least recently used copies no request holds (a copy just registered included) down to the bounds.
        for name in list(self._cpu):
            if self._cpu_fits(0, 0):
                break
            if self._refs.get(name, 0) == 0:
                del self._cpu[name]
                if self.residency.shared:
                    self.residency.drop(name)
                self.num_evictions += 1
        self.peak_cpu_loras = max(self.peak_cpu_loras, self._cpu_usage()[0])

    def _purge(self, name: str) -> None:
        self._cpu.pop(name, None)
        self.residency.drop(name)  # refs are 0: nothing pins it
        self.registry.remove(name)

    # --- CPU -> device slots (engine thread) ----------------------------------------------------

    def try_admit(self, seq: LoRASequence) -> bool:
        """Pin seq's adapter on the device; False if no room can be made for it this step."""
        name = seq.lora_name
        if name is None:
            return True
        with self._lock:
            model = self._cpu.get(name)  # held there by the request's reference
            slot = None if model is None else self.residency.pin(name, model, self.registry.get(name))
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def release_slot(self, seq: LoRASequence) -> None:
        if seq.lora_name is None or seq.lora_slot is None:
            return
        with self._lock:
            self.residency.unpin(seq.lora_name)
            seq.lora_slot = None

    def prepare(self, seqs: list[Seq], num_new_tokens: list[int]) -> LoRABatch | None:
        """The step's LoRA batch (residency.py), the batch ordered by adapter in place."""
        return self.residency.prepare(seqs, num_new_tokens, self.merged.name, self.batch_cls)


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
