"""Where adapter folders come from, told apart by their location: a local path, or s3://bucket/prefix.

    sources = AdapterSources(config)                       # config resolved: adapter_cache_dir is set
    sources.check_allowed(lora_path)                       # the load API's --allowed-lora-dir, before any I/O
    path, model = sources.fetch(location, validate)        # a local folder; `model`: validate's result, or None

A local path is its own folder. A remote one (s3.py) is copied into adapter_cache_dir and validated
there before it shows, so the catalog reads every adapter from a local folder, with the same checks
(lora_model.py). A location a request names (the load API's lora_path) must lie under an
--allowed-lora-dir entry of its own kind; --lora-modules and --adapter-dir are the operator's and
are not confined. A scheme no source serves ("gs://...") is refused, not read as a local path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from ..config_fields import resolved
from ..lora_config import LoRAConfig, is_remote
from .errors import ForbiddenPathError, InvalidAdapterError
from .files import inside
from .s3 import SCHEME as S3_SCHEME
from .s3 import S3Location, S3Source

T = TypeVar("T")


class AdapterSource(Protocol):
    def allows(self, location: str) -> bool:
        """`location` lies under one of this source's --allowed-lora-dir entries. No I/O for a remote one."""
        ...

    def folder(self, location: str, validate: Callable[[Path], T]) -> tuple[Path, T | None]:
        """The local folder holding the adapter, and `validate`'s result when it was called. Blocking."""
        ...


class LocalSource:
    def __init__(self, allowed: Sequence[Path]):
        self.allowed = tuple(Path(os.path.realpath(d)) for d in allowed)  # where the load API may read

    def allows(self, location: str) -> bool:
        """Symlinks and `..` resolved; the files in it are checked again each time they are read (files.py)."""
        if "\x00" in location:  # no file system path holds one (os.path would raise ValueError)
            raise InvalidAdapterError("lora_path must not contain a NUL character", param="lora_path")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in location):  # JSON's lone surrogates: no file name encodes them
            raise InvalidAdapterError("lora_path must not contain a lone surrogate", param="lora_path")
        return inside(Path(os.path.realpath(location)), self.allowed)

    def folder(self, location: str, validate: Callable[[Path], T]) -> tuple[Path, T | None]:
        return Path(location), None  # read, and checked, by the catalog


class S3Folders:
    """s3:// locations as an AdapterSource: S3Source with the allow-list's s3:// entries."""

    def __init__(self, source: S3Source, allowed: Sequence[S3Location]):
        self.source = source
        self.allowed = tuple(allowed)

    def allows(self, location: str) -> bool:
        loc = S3Location.parse(location)
        return any(loc.inside(entry) for entry in self.allowed)

    def folder(self, location: str, validate: Callable[[Path], T]) -> tuple[Path, T | None]:
        return self.source.fetch(S3Location.parse(location), validate)


class AdapterSources:
    def __init__(self, config: LoRAConfig):
        allowed = [str(d) for d in config.allowed_lora_dir]
        self.s3 = S3Source(resolved(config.adapter_cache_dir, "adapter_cache_dir"), config.max_adapter_bytes)
        self.local = LocalSource([Path(d) for d in allowed if not is_remote(d)])
        s3_allowed = [S3Location.parse(d, param="allowed_lora_dir") for d in allowed if d.startswith(S3_SCHEME)]
        self._remote: dict[str, AdapterSource] = {S3_SCHEME: S3Folders(self.s3, s3_allowed)}
        # Where a load-API adapter's files may lie when read: the local entries, and the s3:// copies.
        self.read_roots = (*self.local.allowed, *([Path(os.path.realpath(self.s3.cache_dir))] if s3_allowed else []))

    def source(self, location: str) -> AdapterSource:
        if not is_remote(location):
            return self.local
        scheme = location[: location.index("://") + 3]
        if scheme not in self._remote:
            supported = ", ".join(self._remote)
            raise InvalidAdapterError(
                f"lora_path {location!r}: unsupported scheme {scheme} (local paths and {supported})", param="lora_path"
            )
        return self._remote[scheme]

    def check_allowed(self, location: str) -> None:
        """403 unless `location` lies under an --allowed-lora-dir entry (400 for a malformed one)."""
        if not self.read_roots:
            raise ForbiddenPathError("loading adapters by path is disabled; start the server with --allowed-lora-dir", param="lora_path")
        if not self.source(location).allows(location):
            raise ForbiddenPathError("lora_path is outside the directories adapters may be loaded from", param="lora_path")

    def fetch(self, location: str, validate: Callable[[Path], T]) -> tuple[Path, T | None]:
        """The local folder of the adapter at `location` (downloaded first if remote). Blocking."""
        return self.source(location).folder(location, validate)
