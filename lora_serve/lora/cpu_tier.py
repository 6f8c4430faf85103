"""The CPU tier of the adapter catalog: the LRU of adapters' CPU copies, bounded by max_cpu_loras and
lora_memory_gb (budget.py), and the references requests hold on them.

disk (registry)  --read() / acquire(), any thread, blocking I/O-->  CPU (this file)

Every method runs under `lock`, the catalog's lock (shared with the residency manager, manager.py);
`acquire` reads from disk outside it, holding a place for the copy (`_loading`) meanwhile. A copy
with references is never evicted; `acquire` waits on `_cpu_freed` for a place while all are held.
The invariants (why the wait always ends, what a merged copy counts) are in catalog.py's docstring.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from .budget import LoRAMemory
from .errors import AdapterBusyError, AdapterChangedError, AdapterNotFoundError
from .lora_model import LoRAModel
from .registry import AdapterRecord, AdapterRegistry
from .residency import Residency
from .slot_writes import SlotWriter
from .sources import AdapterSources


class CpuTier:
    """Adapters' CPU copies and their references; AdapterCatalog adds registration and lookups."""

    def __init__(self, registry: AdapterRegistry, sources: AdapterSources, residency: Residency,
                 memory: LoRAMemory, writer: SlotWriter):  # fmt: skip
        self.registry = registry
        self.sources = sources
        self.residency = residency  # its `drop` forgets a copy the catalog lets go; `location` reads it
        self.memory = memory
        self.writer = writer
        # Shared by the residency manager (manager.py): merges, pins and CPU evictions exclude each other.
        self.lock = threading.RLock()
        self._cpu_freed = threading.Condition(self.lock)  # notified when a CPU copy may have become evictable
        self._cpu: OrderedDict[str, LoRAModel] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, int] = {}  # being read from disk by acquire(), with their bytes: each holds a place
        self._refs: dict[str, int] = {}  # in-flight requests per adapter (those waiting for a CPU place too)
        self.merged_name: str | None = None  # set by the residency manager under the lock
        self.peak_cpu_loras = 0  # most CPU places taken at once (copies + reads), for tests and metrics
        self.num_loads = 0  # adapters read from disk into CPU memory: at registration, and again after eviction
        self.num_cpu_evictions = 0
        self.load_seconds = 0.0

    def acquire(self, name: str, wait_s: float | None = 0.0, abandoned: threading.Event | None = None) -> AdapterRecord:
        """Make `name` CPU-resident and hold it there until `release(name)`; its record. Blocking I/O.

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
                return record
            self._loading[name] = self.writer.host_bytes(record.num_params)
            self.peak_cpu_loras = max(self.peak_cpu_loras, self._cpu_usage()[0])
        try:
            model = self.read(name, record.path, record.origin)
            if model.identity != record.identity:  # rewritten in place: serving it under this registration would mix weights
                raise AdapterChangedError(
                    f"adapter {name!r} changed on disk since it was registered; load it again to serve the new weights",
                    param="model",
                )
            loaded = self.residency.prepare_copy(self.writer.host_copy(model, self.residency.layout))
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
        return record

    def read(self, name: str, path, origin: str) -> LoRAModel:
        """Read and validate an adapter folder (disk -> CPU), counted in num_loads and load_seconds;
        uploads and s3:// copies call it on their staged folder. A load-API adapter's files must lie in
        sources.read_roots. Blocking."""
        start = time.perf_counter()
        model = self.registry.validate(name, path, self.sources.read_roots if origin == "load-api" else None)
        with self.lock:
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
        with self.lock:
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

    def cpu_copy(self, name: str) -> LoRAModel | None:
        """The CPU copy of `name` (lock held by the caller); a lease keeps it there."""
        return self._cpu.get(name)

    def hold(self, name: str) -> None:
        """One more reference on a CPU-resident adapter (a merge keeps one until unmerged). Lock held."""
        self._refs[name] = self._refs.get(name, 0) + 1

    # --- the room (lock held) ----------------------------------------------------------------------

    def _take_cpu_place(self, name: str) -> bool:
        """True when `name` is resident (now most recently used) or room was freed for reading it;
        False while another thread reads it, or the room is held by adapters in use."""
        if name in self._cpu:
            self._cpu.move_to_end(name)
            return True
        if name in self._loading:
            return False
        need = self.writer.host_bytes(self.registry.get(name).num_params)
        while not self._cpu_fits(1, need):
            victim = next((n for n in self._cpu if self._refs.get(n, 0) == 0), None)
            if victim is None:
                return False
            self._drop_cpu(victim)
        return True

    def _cpu_usage(self) -> tuple[int, int]:
        """(places, bytes) the CPU tier holds: copies and reads in progress; the merged adapter's copy,
        held by the merge, never evicted and with a slot of its own, is not counted."""
        held = [self.writer.host_bytes(m.num_params) for n, m in self._cpu.items() if n != self.merged_name] + list(self._loading.values())
        return len(held), sum(held)

    def _cpu_fits(self, places: int, num_bytes: int) -> bool:
        taken, used = self._cpu_usage()
        limit = self.memory.max_cpu_loras
        return (limit is None or taken + places <= limit) and used + num_bytes <= self.memory.cpu_bytes

    def _evict_cpu(self) -> None:
        # Evict least recently used copies no request holds (a copy just registered included) down to the bounds.
        for name in list(self._cpu):
            if self._cpu_fits(0, 0):
                break
            if self._refs.get(name, 0) == 0:
                self._drop_cpu(name)
        self.peak_cpu_loras = max(self.peak_cpu_loras, self._cpu_usage()[0])

    def _drop_cpu(self, name: str) -> None:
        del self._cpu[name]
        if self.residency.shared:
            self.residency.drop(name)  # its views would keep the copy alive
        self.num_cpu_evictions += 1

    def _purge(self, name: str) -> None:
        self._cpu.pop(name, None)
        self.residency.drop(name)  # refs are 0: nothing pins it
        self.registry.remove(name)
