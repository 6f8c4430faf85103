"""The adapter catalog: which adapters exist, where they come from, and their CPU copies.

The engine's one door for the API and deployments (engine.adapters). Thread-safe: request
threads register, look up and open adapters while the engine thread runs steps.

disk (registry)  --open() / acquire(), any thread, blocking I/O-->  CPU (LRU, bytes, max_cpu_loras)
CPU              --manager.try_admit(), engine thread-->  device (residency.py)

A request holds a lease (`open`) on its adapter from arrival to end: a reference on the CPU
copy, so an adapter in use is never dropped from CPU. max_cpu_loras is a hard bound on the
copies held (and being read) at once: when they are all in use, `open` for another adapter
waits until a request releases one. That always comes: the CPU tier holds at least as many
adapters as the device, so the requests holding copies run (or wait for device room that
running ones free) and finish. Serving on CPU, the CPU tier is the memory the matmuls read
(residency.py, "shared"): lora_memory_gb bounds its bytes. The merged adapter's copy is counted
apart, as its negated copy has a slot of its own; at most one copy more is resident meanwhile,
and it is not held by a request that could wait. Reading from disk never happens on the engine
thread, so decoding goes on while an adapter loads (the CPU tier: cpu_tier.py). Replicas may share adapter_dir
(adapter_dir.py): a name is brought in line with that folder on the next request naming it. A copy
read again after eviction must hold the weights registered under the name (their identity, which
also keys their cached K/V): files rewritten in place meanwhile are refused (AdapterChangedError).
An adapter from s3:// (sources.py) is read from its local copy, which a new version of the objects
never overwrites (the copy is keyed by their ETags): its name keeps serving the weights registered.
"""

from __future__ import annotations

import builtins
import logging
import threading
from pathlib import Path

import torch

from ..config_fields import resolved
from ..lora_config import LoRAConfig, is_remote
from ..model.arch import ModelArch
from . import adapter_dir
from .budget import LoRAMemory
from .composition import Composition
from .cpu_tier import CpuTier
from .dora import BaseNorms
from .errors import (
    AdapterError,
    AdapterMergedError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    UnsupportedAdapterError,
)
from .lora_model import LoRAModel
from .overflow import check_weighted_gain
from .registry import AdapterRecord, AdapterRegistry
from .residency import Residency
from .slot_writes import SlotWriter
from .sources import AdapterSources
from .store import read_owner

log = logging.getLogger(__name__)


class AdapterLease:
    """A request's hold on its adapter's CPU copy, from `AdapterCatalog.open` to `close` (idempotent).
    It rides on the request's Sequence; the engine closes it when the request ends."""

    def __init__(self, catalog: AdapterCatalog, record: AdapterRecord):
        self.catalog = catalog
        self.record = record
        self.name = record.name
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.catalog.release(self.name)


class AdapterCatalog(CpuTier):
    def __init__(self, arch: ModelArch, config: LoRAConfig, base_name: str, base_params: int,
                 residency: Residency, memory: LoRAMemory, writer: SlotWriter, narrowest: torch.dtype,
                 base: BaseNorms | None = None):  # fmt: skip
        self.config = config
        self.max_loras = config.max_loras
        self.max_adapter_bytes = config.max_adapter_bytes
        self.base_params = base_params
        # Scanned at start and looked in for names on first use: a local folder (where uploads are stored
        # too), or an s3:// prefix (remote_adapter_dir; adapter_dir is then None: nothing is stored here).
        location = resolved(config.adapter_dir, "adapter_dir")  # a Path, or an s3:// URL (lora_config.Location)
        self.adapter_dir = location if isinstance(location, Path) else None
        self.remote_adapter_dir = None if isinstance(location, Path) else str(location)
        # Local folders and s3:// copies, and where the load API may read from (--allowed-lora-dir);
        # an adapter's update is checked against the narrower of the base's and the slots' dtypes;
        # base: what DoRA adapters' scales are computed against when read (dora.py).
        registry = AdapterRegistry(arch, config.max_lora_rank, base_name, narrowest, base)
        super().__init__(registry, AdapterSources(config), residency, memory, writer)
        self.num_merges = 0

    # --- lookups (any thread) ----------------------------------------------------------------------

    def get(self, name: str) -> AdapterRecord:
        return self.registry.get(name)

    def contains(self, name: str) -> bool:
        return self.registry.contains(name)

    def list(self) -> list[AdapterRecord]:
        return self.registry.list()

    def set_auto_merge(self, name: str, enabled: bool) -> AdapterRecord:
        return self.registry.set_auto_merge(name, enabled)

    def check_composition(self, composition: Composition) -> None:
        """Raise an AdapterError naming `adapters` for a composition that can never run: an unknown adapter
        (404), more adapters than max_loras lets one batch hold, or weights that can overflow (400)."""
        if self.max_loras is not None and len(composition.weights) > self.max_loras:
            raise AdapterError(
                f"adapters names {len(composition.weights)} adapters; this server runs at most max_loras={self.max_loras} at once",
                param="adapters",
            )
        records = [self.registry.find(name) for name in composition.names]
        missing = next((name for name, r in zip(composition.names, records) if r is None), None)
        if missing is not None:
            raise AdapterNotFoundError(f"The adapter `{missing}` does not exist.", param="adapters")
        dora = next((r.name for r in records if r is not None and r.use_dora), None)
        if dora is not None and composition.plain_name is None:  # its ratio depends on the whole update (dora.py)
            raise UnsupportedAdapterError(
                f"adapter {dora!r} is a DoRA adapter, which cannot be weighted or composed: name it in `model`", param="adapters"
            )
        parts = [(r.name, w, r.gain) for r, (_, w) in zip(records, composition.weights) if r is not None and r.gain is not None]
        check_weighted_gain(parts, self.registry.dtype)

    def location(self, name: str) -> str:
        """ "device", "cpu" or "disk": a snapshot for the API."""
        if self.residency.is_resident(name) or (self.residency.shared and name in self._cpu):
            return "device"  # shared: the CPU copy is what the matmuls read
        return "cpu" if name in self._cpu else "disk"

    @property
    def num_evictions(self) -> int:
        """Adapters evicted from the CPU tier or from device memory."""
        return self.num_cpu_evictions + self.residency.num_evictions

    # --- registration --------------------------------------------------------------------------

    def register_from(self, name: str, location: str, origin: str) -> AdapterRecord:
        """Register the adapter at `location` (a local folder, or s3://, copied and validated first: sources.py).
        Blocking I/O. The load API checks `location` against --allowed-lora-dir (sources.check_allowed) first."""
        path, model = self.sources.fetch(location, lambda staged: self.read(name, staged, origin))
        return self.register(name, path, origin, model, source=location if is_remote(location) else None)

    def register(self, name: str, path, origin: str, model: LoRAModel | None = None, source: str | None = None) -> AdapterRecord:
        """auto_merge (may --merge-policy auto merge it) is set for an adapter of no tenant: from
        --lora-modules, the load API, or an adapter_dir folder without a .tenant file; a tenant's
        upload gets it only from an admin (registry.set_auto_merge): no tenant changes the base for all.
        source: the s3:// location `path` is the local copy of."""
        in_store = self.adapter_dir is not None and adapter_dir.contains(self.adapter_dir, path)
        # Before validation: a folder replaced after this stat is caught (and read again) on its next use.
        folder_id = adapter_dir.folder_id(path) if in_store else None
        auto_merge = not in_store or read_owner(path) is None
        model = model or self.read(name, path, origin)
        if self.writer.host_bytes(model.num_params) > self.memory.cpu_bytes:
            raise AdapterTooLargeError(
                f"adapter {name!r} needs {self.writer.host_bytes(model.num_params) / 1e6:.0f} MB of CPU memory; the adapter memory "
                f"budget (lora_memory_gb) holds {self.memory.cpu_bytes / 1e6:.0f} MB",
                param="adapter_model",
            )
        record, loaded = self.registry.add(name, path, origin, model, folder_id, auto_merge, source)
        loaded = self.residency.prepare_copy(self.writer.host_copy(loaded, self.residency.layout))
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
        with self.lock:
            self._cpu[name] = loaded
            self._evict_cpu()
        return record

    def register_startup_adapters(self) -> None:
        adapter_dir.register_at_start(self)

    def sync_with_adapter_dir(self, name: str) -> bool:
        """True if `name` is registered once it is in line with adapter_dir (see adapter_dir.sync)."""
        return adapter_dir.sync(self, name)

    def drop_removed(self) -> builtins.list[str]:
        """Unregister what other replicas deleted from adapter_dir; their names (before listing)."""
        return adapter_dir.drop_removed(self)

    def resolve_from_adapter_dir(self, name: str) -> bool:
        """Register adapter_dir/<name> if it is there and `name` is not registered; True if it is afterwards."""
        return adapter_dir.resolve(self, name)

    def unregister(self, name: str, record: AdapterRecord | None = None) -> None:
        """Refuse new requests at once; drop the weights when the in-flight ones have finished.
        A merged adapter is refused (AdapterMergedError): the engine unmerges it first, on its thread
        and under this lock (LLMEngine.remove_adapter), so after a merge and an unregister of one
        adapter, in any order, either it is gone and the base unmerged, or it is merged and registered.
        record: only that registration of the name."""
        with self.lock:
            current = self.registry.find(name)
            if current is None or (record is not None and current is not record):
                raise AdapterNotFoundError(f"adapter {name!r} does not exist", param="name")
            if self.merged_name == name:
                raise AdapterMergedError(f"adapter {name!r} is merged into the base weights; unmerge it first", param="name")
            current.deleting = True
            if self._refs.get(name, 0) == 0:
                self._purge(name)

    # --- disk -> CPU (request threads) -----------------------------------------------------------

    def open(self, name: str, wait_s: float | None = 0.0, abandoned: threading.Event | None = None) -> AdapterLease:
        """A lease on `name`'s CPU copy, read from disk first if need be (blocking: see acquire)."""
        record = self.acquire(name, wait_s, abandoned)
        return AdapterLease(self, record)
