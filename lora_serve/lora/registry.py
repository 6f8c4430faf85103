"""Every adapter the server knows by name: where its files are and what they hold.

Registering an adapter reads and validates it in full (config, safetensors header,
shapes against the base, finite values; a DoRA adapter's scales against the base's
weights, dora.py), so a broken adapter is refused when it is added, not when a request
first uses it. Thread-safe: the API adds and removes while
the engine thread looks adapters up.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.arch import ModelArch
from .dora import BaseNorms, with_ratios
from .errors import AdapterExistsError, AdapterNotFoundError, InvalidAdapterError, UnsupportedAdapterError
from .files import Roots
from .lora_model import Gain, LoRAModel
from .overflow import check_gain, gain_of

# One grammar for every way a name arrives (upload, load API, --lora-modules, adapter_dir). It starts with
# a letter or digit, so no name is ".", ".." or a dot-folder of the store (".upload-*", ".deleted-*",
# ".lock"): those are skipped by the start-up scan and removed by its clean-up. No "/" or ":" either, so a
# name is one path segment and never reads as "base:adapter". vLLM-style names ("sql-lora",
# "my_adapter.v2") fit.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN)


@dataclass
class AdapterRecord:
    name: str
    path: Path
    origin: str  # "adapter-dir" | "lora-modules" | "upload" | "load-api"
    ranks: list[int]
    alpha: float
    targets: list[str]
    num_params: int
    num_bytes: int
    sha256: str  # of adapter_model.safetensors
    identity: str  # of what it computes (LoRAModel.identity): the prefix cache's key, never the name
    created: int = field(default_factory=lambda: int(time.time()))
    requests_served: int = 0
    deleting: bool = False  # unlisted and refused to new requests; purged when in-flight ones end
    folder_id: tuple[int, int, int] | None = None  # (st_dev, st_ino, st_ctime_ns) of its adapter_dir folder when registered; None elsewhere
    auto_merge: bool = False  # --merge-policy auto may merge it (see AdapterCatalog.register)
    use_dora: bool = False  # DoRA (dora.py)
    source: str | None = None  # the s3:// location `path` is a local copy of; None for a local folder
    gain: Gain | None = None  # its update's largest bounds (overflow.py): what a composition's weights may scale


def check_name(name: str, base_name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterError(
            f"adapter name {name!r} must be 1 to 64 characters of letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit ({NAME_PATTERN})",
            param="name",
        )
    if name == base_name:
        raise InvalidAdapterError(f"adapter name {name!r} is the base model's id", param="name")


class AdapterRegistry:
    def __init__(self, arch: ModelArch, max_rank: int, base_name: str, dtype: torch.dtype = torch.float32, base: BaseNorms | None = None):
        self.arch = arch
        self.base = base  # the base's weights, which a DoRA adapter's scales are computed against (dora.py)
        self.max_rank = max_rank
        self.dtype = dtype  # the narrowest dtype an adapter's update runs in (see overflow.py)
        self.base_name = base_name
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()

    def validate(self, name: str, path: Path, roots: Roots = None) -> LoRAModel:
        """Load and check an adapter folder without registering it (also how a registered one is
        reloaded; roots: see files.py). The model keeps its gain, which add() records."""
        check_name(name, self.base_name)
        model = LoRAModel.load(name, Path(path), self.arch, self.max_rank, roots)
        model.gain = check_gain(model, self.dtype)
        if model.config.use_dora:
            if self.base is None:
                raise UnsupportedAdapterError("DoRA adapters need the base model's weights, which this check has not", param="use_dora")
            model = with_ratios(model, self.base, self.dtype)
        return model

    def add(
        self,
        name: str,
        path: Path,
        origin: str,
        model: LoRAModel | None = None,
        folder_id: tuple[int, int, int] | None = None,
        auto_merge: bool = False,
        source: str | None = None,
    ) -> tuple[AdapterRecord, LoRAModel]:
        check_name(name, self.base_name)  # also when the caller validated the weights itself
        model = model or self.validate(name, path)
        # A model the caller validated (an upload's, an S3 download's) carries its gain; one built past the
        # check (a test's, a benchmark's random one) is measured, not refused.
        gain = model.gain if model.gain is not None else gain_of(model)
        ranks = sorted({w.A.shape[0] for w in model.weights.values()})
        record = AdapterRecord(
            name=name,
            path=Path(path),
            origin=origin,
            ranks=ranks,
            alpha=float(model.config.lora_alpha),
            targets=sorted({module for _, module in model.weights}),
            num_params=model.num_params,
            num_bytes=model.num_bytes,
            sha256=model.sha256,
            identity=model.identity,
            folder_id=folder_id,
            auto_merge=auto_merge,
            use_dora=model.config.use_dora,
            source=source,
            gain=gain,
        )
        with self._lock:
            if name in self._records:
                raise AdapterExistsError(f"adapter {name!r} already exists", param="name")
            self._records[name] = record
        return record, model

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._records.get(name)
        if record is None or record.deleting:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist", param="model")
        return record

    def contains(self, name: str) -> bool:
        return self.find(name) is not None

    def find(self, name: str) -> AdapterRecord | None:
        with self._lock:
            record = self._records.get(name)
        return None if record is None or record.deleting else record

    def may_auto_merge(self, name: str) -> bool:
        record = self.find(name)
        return record is not None and record.auto_merge

    def set_auto_merge(self, name: str, enabled: bool) -> AdapterRecord:
        """Let --merge-policy auto merge `name`, or not (an admin's choice, kept until it is unregistered)."""
        record = self.get(name)
        record.auto_merge = enabled
        return record

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.pop(name, None)

    def list(self) -> list[AdapterRecord]:
        with self._lock:
            return [r for r in self._records.values() if not r.deleting]
