"""Adapter folders the server owns: uploads written atomically into adapter_dir, and deleted the same way.

    adapter_dir/
      my-adapter/            a stored adapter (the folder name is its name)
        .tenant              the tenant that uploaded it (absent: no tenant; see api/tenants.py)
      .upload-k3j9x/         an upload in progress
        .lock                flock-ed (exclusive) by the uploading process for the upload's whole life
        adapter/             written and validated here; renamed to adapter_dir/<name> when whole
      .deleted-p0q2z/        a stored adapter being removed (locked the same way)
        adapter/             renamed here first, then deleted

A folder appears under its name only by `os.rename` of a complete, validated upload,
and disappears only by `os.rename` into a dot-folder, so the start-up scan (which skips
dot-folders) never sees half an adapter. Several servers may share adapter_dir, so a
store being opened removes only the dot-folders whose lock it can take at once: those of
crashed processes (the kernel releases a dead process's flocks, kill -9 included), never
those of uploads and deletions still running elsewhere.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import AdapterExistsError, InvalidAdapterError
from .lora_model import LoRAModel

log = logging.getLogger(__name__)

UPLOAD_PREFIX = ".upload-"
DELETED_PREFIX = ".deleted-"
LOCK_FILE = ".lock"
PAYLOAD = "adapter"  # the adapter folder inside an upload's or a deletion's dot-folder
OWNER_FILE = ".tenant"


def _exists(name: str) -> AdapterExistsError:
    return AdapterExistsError(f"adapter {name!r} already exists in the adapter store", param="name")


class AdapterStore:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        self.remove_leftovers()

    def remove_leftovers(self) -> list[Path]:
        """Delete what crashed uploads and deletions left behind; returns the folders removed.
        Those still running, in this process or another one sharing the folder, are left alone."""
        removed = []
        for path in sorted(self.root.iterdir()):
            if not path.name.startswith((UPLOAD_PREFIX, DELETED_PREFIX)) or path.is_symlink() or not path.is_dir():
                continue
            try:
                fd = _lock(path, wait=False)
            except OSError as exc:  # a file system without flock: better a leftover than a broken upload
                log.warning("leaving %s: cannot lock it (%s)", path, exc)
                continue
            if fd is None:
                continue
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(path)
        return removed

    def folder(self, name: str) -> Path:
        """adapter_dir/<name>, refused unless it is a direct child of adapter_dir that is not a dot-folder
        (those are the store's own, and the start-up scan never registers them; check_name comes first)."""
        path = Path(os.path.realpath(self.root / name))
        if name.startswith(".") or path.parent != self.root or path.name != name:
            raise InvalidAdapterError(f"adapter name {name!r} names no folder in the adapter store", param="name")
        return path

    def is_managed(self, path: Path) -> bool:
        return Path(os.path.realpath(path)).parent == self.root

    def owner(self, path: Path) -> str | None:
        """The tenant a stored adapter was uploaded by; None outside the store or without one."""
        return read_owner(path) if self.is_managed(path) else None

    def usage(self, tenant: str) -> tuple[int, int]:
        """(adapters, bytes of their files) stored by `tenant`: what its quota counts. Reads adapter_dir
        itself, so uploads through other replicas sharing it count too."""
        count = size = 0
        for path in self.root.iterdir():
            try:
                if path.name.startswith(".") or path.is_symlink() or not path.is_dir() or self.owner(path) != tenant:
                    continue
                files = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != OWNER_FILE)
            except FileNotFoundError:  # deleted meanwhile (here or by another replica)
                continue
            count, size = count + 1, size + files
        return count, size

    def save(self, name: str, files: Mapping[str, BinaryIO], validate: Callable[[Path], LoRAModel]) -> tuple[Path, LoRAModel]:
        """Write `files` (file name -> readable binary stream) as adapter `name`; validate before it shows.

        Blocking I/O: run it off the event loop. Raises the validator's AdapterError, or
        AdapterExistsError (409) when the folder already exists; nothing is left behind either way.
        """
        target = self.folder(name)
        if target.exists():
            raise _exists(name)
        with _locked_folder(self.root, UPLOAD_PREFIX) as tmp:
            staged = tmp / PAYLOAD
            staged.mkdir()
            for file_name, stream in files.items():
                with open(staged / file_name, "wb") as out:
                    shutil.copyfileobj(stream, out)
                    out.flush()
                    os.fsync(out.fileno())  # on disk before the rename publishes it, even across a power cut
            model = validate(staged)
            try:
                # Refused onto a non-empty folder, so of two concurrent uploads of one name only one lands.
                os.rename(staged, target)
            except OSError:
                raise _exists(name) from None
            _fsync_dir(self.root)
        return target, model

    def remove(self, path: Path) -> bool:
        """Delete a stored adapter folder; False (and nothing done) for a folder outside the store,
        or one another process sharing the store removed first."""
        path = Path(os.path.realpath(path))
        if path.parent != self.root or not path.is_dir():
            return False
        with _locked_folder(self.root, DELETED_PREFIX) as doomed:
            try:
                os.rename(path, doomed / PAYLOAD)  # gone from the store in one step; the rmtree may take a while
            except FileNotFoundError:
                return False
        return True


def read_owner(folder: Path) -> str | None:
    """The tenant named by folder/.tenant; None without one (an adapter that belongs to no tenant)."""
    owner_file = Path(os.path.realpath(folder)) / OWNER_FILE
    if not owner_file.is_file():
        return None
    return owner_file.read_text().strip() or None


@contextmanager
def _locked_folder(root: Path, prefix: str) -> Iterator[Path]:
    """A new dot-folder in root, locked for the whole block and removed (still locked) after it."""
    while True:  # again only if a store opening elsewhere locked and removed it between mkdtemp and flock
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        fd = _lock(folder, wait=True)
        if fd is not None:
            break
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def _lock(folder: Path, *, wait: bool) -> int | None:
    """An open fd holding the exclusive flock of folder/.lock (created if missing); None when a live
    process holds it (wait=False) or the folder was removed meanwhile. Closing the fd releases it."""
    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return None
    locked = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Whoever held the lock before may have removed the folder, this file with it.
        locked = os.path.samestat(os.fstat(fd), os.stat(lock))
    except (BlockingIOError, FileNotFoundError, NotADirectoryError):
        pass
    finally:
        if not locked:
            os.close(fd)
    return fd if locked else None


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
