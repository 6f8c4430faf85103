"""Merged mode, run on the engine thread between steps: folding an adapter into the base weights and
out again, asked for by the API (merge, unmerge, removal of a merged adapter) or by the merge policy
(lora/merge_policy.py) watching each step's tokens. The merge itself is LoRAManager's (lora/merge.py);
what is here is when, and under which lock.
"""

from __future__ import annotations

import logging
from collections import Counter

from ..lora.catalog import AdapterCatalog
from ..lora.errors import AdapterError
from ..lora.manager import LoRAManager
from ..lora.merge_policy import MergePolicy
from ..lora.registry import AdapterRecord
from .kv_cache import KVCache
from .scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class Merging:
    def __init__(self, lora: LoRAManager, adapters: AdapterCatalog, kv_cache: KVCache, policy: MergePolicy | None):
        self.lora = lora
        self.adapters = adapters
        self.kv_cache = kv_cache
        self.policy = policy

    def merge(self, name: str, auto: bool = False) -> None:
        """Fold `name` into the base weights now (blocking I/O if it is not CPU-resident). auto: the
        merge policy's choice (LoRAManager.merge refuses an adapter not marked auto_merge)."""
        lease = self.adapters.open(name)
        try:
            self.lora.merge(lease, auto)
        finally:
            lease.close()

    def unmerge(self, name: str | None = None) -> None:
        """Restore the base weights bit for bit, if `name` (None: any adapter) is the merged one."""
        if name is None or self.lora.merged.name == name:
            self.lora.unmerge()

    def remove(self, record: AdapterRecord) -> None:
        """Unregister that registration of an adapter, unmerging it first if merged, under the catalog's
        lock: after a merge and a removal of one adapter, in any order, either it is gone and the base
        unmerged, or it is merged and registered. Running requests on it finish first."""
        with self.adapters.lock:
            if self.lora.merged.name == record.name and self.adapters.registry.find(record.name) is record:
                self.lora.unmerge()
            self.adapters.unregister(record.name, record=record)
        self.kv_cache.forget_adapter(record.name)

    def apply_policy(self, batch: ScheduledBatch) -> None:
        assert self.policy is not None  # step() calls this only with a policy
        tokens: Counter = Counter()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            tokens[seq.adapter_key] += n  # a composition's label is never merged
        decision = self.policy.observe(tokens, self.lora.merged.name, self.adapters.registry.may_auto_merge)
        if decision is None:
            return
        log.info("merge policy: %s %s (%s)", decision.action, decision.adapter, decision.reason)
        try:
            if decision.action == "merge":
                self._merge_resident(decision.adapter)
            else:
                self.lora.unmerge()
        except AdapterError as exc:  # e.g. deleted or unmarked meanwhile: serving goes on unmerged
            log.warning("merge policy: %s", exc)

    def _merge_resident(self, name: str) -> None:
        """The merge policy's merge: of an adapter requests in this step hold in CPU memory, so opening
        it here reads nothing from disk."""
        with self.adapters.lock:  # held from the check to the lease: no request thread evicts the copy between
            if self.adapters.cpu_copy(name) is None:
                raise AdapterError(f"adapter {name!r} is not in CPU memory", param="name")
            self.merge(name, auto=True)
