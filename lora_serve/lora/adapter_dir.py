"""The adapter folder replicas share (--adapter-dir): what the catalog registers from it, and when.

It is a local folder, or an s3:// prefix (read-only: nothing is stored there by the server). With
s3://, every sub-prefix is registered at start, and a name a request first uses afterwards is looked
up under the prefix (a ListObjectsV2 on a worker thread; concurrent first requests download it once:
s3.py); an adapter registered from it keeps its version until it is unloaded (vLLM's resolver, too).

At start every sub-folder is registered (a bad one is logged and skipped, so one broken upload
cannot keep the server down). Other replicas sharing the folder store and delete adapters
meanwhile: a name is brought in line with the folder on the next request naming it (`sync`),
and a listing first drops what was deleted (`drop_removed`), as vLLM's filesystem resolver does.
A folder is told apart from one stored again under the same name by `folder_id`. Blocking I/O.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from ..config import LoRAConfig
from .errors import (
    AdapterError,
    AdapterExistsError,
    AdapterMergedError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    InvalidAdapterError,
    SourceUnavailableError,
    UnsupportedMediaError,
)
from .lora_model import CONFIG_FILE
from .registry import AdapterRecord, AdapterRegistry, check_name
from .s3 import S3Location
from .sources import AdapterSources

log = logging.getLogger(__name__)


class AdapterCatalog(Protocol):
    """What this module uses of the catalog (catalog.py, which calls in here)."""

    config: LoRAConfig
    adapter_dir: Path | None
    remote_adapter_dir: str | None
    registry: AdapterRegistry
    sources: AdapterSources

    def register(self, name: str, path, origin: str) -> AdapterRecord: ...
    def register_from(self, name: str, location: str, origin: str) -> AdapterRecord: ...
    def unregister(self, name: str, record: AdapterRecord | None = None) -> None: ...
    def contains(self, name: str) -> bool: ...
    def list(self) -> list[AdapterRecord]: ...


def register_at_start(catalog: AdapterCatalog) -> None:
    """--lora-modules (a bad one stops the start) and every sub-folder of --adapter-dir."""
    for spec in catalog.config.lora_modules:
        name, _, path = spec.partition("=")
        catalog.register_from(name, path, "lora-modules")
    if catalog.remote_adapter_dir is not None:
        _register_remote_at_start(catalog, catalog.remote_adapter_dir)
    folder = catalog.adapter_dir
    if folder is None or not folder.is_dir():
        return
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith(".") and not catalog.contains(sub.name):
            try:
                catalog.register(sub.name, sub, "adapter-dir")
            except AdapterError as exc:
                log.error("skipping adapter folder %s: %s", sub, exc)


def sync(catalog: AdapterCatalog, name: str) -> bool:
    """Bring `name` in line with adapter_dir; True if it is registered afterwards. One stat when
    nothing changed. Registered from a folder of adapter_dir that is gone or was replaced since
    (another replica deleted it, or deleted and uploaded it again): unregistered, requests running
    on it finishing first. Not registered: adapter_dir/<name> is registered if it is there."""
    record = catalog.registry.find(name)
    if record is None:
        return resolve(catalog, name)
    if record.folder_id is None or folder_id(record.path) == record.folder_id:
        return True
    _unregister_stale(catalog, record)
    # A replaced folder is read again, once the old copy's requests are done (until then: 404).
    return resolve(catalog, name)


def drop_removed(catalog: AdapterCatalog) -> list[str]:
    """Unregister every adapter whose adapter_dir folder is gone or was replaced; their names."""
    stale = [r for r in catalog.list() if r.folder_id is not None and folder_id(r.path) != r.folder_id]
    for record in stale:
        _unregister_stale(catalog, record)
    return [r.name for r in stale]


def resolve(catalog: AdapterCatalog, name: str) -> bool:
    """Register adapter_dir/<name> on first use if it appeared after the start-up scan. True if
    `name` is registered afterwards. Only a direct child that is not a dot-folder."""
    if catalog.contains(name):
        return True
    try:
        check_name(name, catalog.registry.base_name)
    except AdapterError:
        return False
    if catalog.remote_adapter_dir is not None:
        return _resolve_remote(catalog, name, catalog.remote_adapter_dir)
    if catalog.adapter_dir is None:
        return False
    root = Path(os.path.realpath(catalog.adapter_dir))
    path = Path(os.path.realpath(root / name))
    if name.startswith(".") or path.parent != root or path.name != name or not (path / CONFIG_FILE).is_file():
        return False
    try:
        catalog.register(name, path, "adapter-dir")
    except AdapterExistsError:  # a concurrent request registered it first, or it is being deleted
        return catalog.contains(name)
    except AdapterError as exc:
        log.warning("not resolving adapter folder %s: %s", path, exc)
        return False
    return True


def _register_remote_at_start(catalog: AdapterCatalog, url: str) -> None:
    """Every sub-prefix of an s3:// adapter_dir; a bad one is logged and skipped. The store must answer."""
    for name in catalog.sources.s3.children(S3Location.parse(url, param="adapter_dir")):
        try:
            check_name(name, catalog.registry.base_name)
            if not catalog.contains(name):
                catalog.register_from(name, f"{url.rstrip('/')}/{name}", "adapter-dir")
        except (AdapterError, OSError) as exc:
            log.error("skipping adapter %s/%s: %s", url, name, exc)


def _resolve_remote(catalog: AdapterCatalog, name: str, url: str) -> bool:
    """Register <url>/<name> (name checked: one segment) if it holds an adapter. A store that cannot be
    read now (credentials refused, unreachable) is a 502 naming no server location; the log says why."""
    try:
        catalog.register_from(name, f"{url.rstrip('/')}/{name}", "adapter-dir")
    except AdapterNotFoundError:
        return False
    except AdapterExistsError:  # a concurrent request registered it first
        return catalog.contains(name)
    except (InvalidAdapterError, UnsupportedMediaError, AdapterTooLargeError) as exc:
        log.warning("not resolving adapter %s/%s: %s", url, name, exc)
        return False
    except AdapterError as exc:
        log.error("cannot resolve adapter %s/%s: %s", url, name, exc)
        raise SourceUnavailableError(f"adapter {name!r} cannot be read from the adapter store now", param="model") from None
    return True


def contains(root: Path, path) -> bool:
    """Whether `path` is a direct child of the adapter folder `root` (symlinks resolved)."""
    return Path(os.path.realpath(path)).parent == Path(os.path.realpath(root))


def folder_id(path) -> tuple[int, int, int] | None:
    """(device, inode, change time in ns) of a folder, None when it is gone. A folder renamed into
    its place (how an upload lands, see store.py) is another folder even where the file system
    hands the deleted one's inode number out again (ext4 does, at once): its change time differs.
    A stored adapter's folder is never written to after that rename, so its ctime stays put."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _unregister_stale(catalog: AdapterCatalog, record: AdapterRecord) -> None:
    try:
        if catalog.registry.find(record.name) is not record:
            return  # registered again meanwhile, from the new folder
        log.info("adapter %s: %s was removed or replaced; unregistering it", record.name, record.path)
        catalog.unregister(record.name, record=record)
    except AdapterNotFoundError:
        pass  # a concurrent request unregistered it first
    except AdapterMergedError:  # only the engine thread may unmerge; served as merged until then
        log.warning("adapter %s stays registered while it is merged; unmerge it to drop it", record.name)
