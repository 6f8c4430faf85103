"""Adapter folders the server owns: uploads written atomically into adapter_dir, and deleted the same way.

    adapter_dir/
      my-adapter/            a stored adapter (the folder name is its name)
        .tenant              the tenant that uploaded it (absent: no tenant; see api/tenants.py)
      .upload-k3j9x/         an upload being written and validated; renamed to <name> when whole
      .deleted-p0q2z/        a stored adapter being removed; renamed away first, then deleted

A folder appears under its name only by `os.rename` of a complete, validated upload,
and disappears only by `os.rename` to a dot-folder, so the start-up scan (which skips
dot-folders) never sees half an adapter. Dot-folders left by a crash are removed when
the store is opened.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import AdapterExistsError, InvalidAdapterError
from .lora_model import LoRAModel

UPLOAD_PREFIX = ".upload-"
DELETED_PREFIX = ".deleted-"
OWNER_FILE = ".tenant"


def _exists(name: str) -> AdapterExistsError:
    return AdapterExistsError(f"adapter {name!r} already exists in the adapter store", param="name")


class AdapterStore:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        self.remove_leftovers()

    def remove_leftovers(self) -> list[Path]:
        """Delete what crashed uploads and deletions left behind; returns the folders removed."""
        leftovers = [p for p in self.root.iterdir() if p.name.startswith((UPLOAD_PREFIX, DELETED_PREFIX))]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers

    def folder(self, name: str) -> Path:
        """adapter_dir/<name>, refused unless it is a direct child of adapter_dir (check_name comes first)."""
        path = Path(os.path.realpath(self.root / name))
        if path.parent != self.root or path.name != name:
            raise InvalidAdapterError(f"adapter name {name!r} names no folder in the adapter store", param="name")
        return path

    def is_managed(self, path: Path) -> bool:
        return Path(os.path.realpath(path)).parent == self.root

    def owner(self, path: Path) -> str | None:
        """The tenant a stored adapter was uploaded by; None outside the store or without one."""
        owner_file = Path(os.path.realpath(path)) / OWNER_FILE
        if not self.is_managed(path) or not owner_file.is_file():
            return None
        return owner_file.read_text().strip() or None

    def save(
        self, name: str, files: Mapping[str, BinaryIO], validate: Callable[[Path], LoRAModel]
    ) -> tuple[Path, LoRAModel]:
        """Write `files` (file name -> readable binary stream) as adapter `name`; validate before it shows.

        Blocking I/O: run it off the event loop. Raises the validator's AdapterError, or
        AdapterExistsError (409) when the folder already exists; nothing is left behind either way.
        """
        target = self.folder(name)
        if target.exists():
            raise _exists(name)
        tmp = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=self.root))
        try:
            for file_name, stream in files.items():
                with open(tmp / file_name, "wb") as out:
                    shutil.copyfileobj(stream, out)
                    out.flush()
                    os.fsync(out.fileno())  # on disk before the rename publishes it, even across a power cut
            model = validate(tmp)
            try:
                # Refused onto a non-empty folder, so of two concurrent uploads of one name only one lands.
                os.rename(tmp, target)
            except OSError:
                raise _exists(name) from None
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target, model

    def remove(self, path: Path) -> bool:
        """Delete a stored adapter folder; False (and nothing done) for a folder outside the store."""
        path = Path(os.path.realpath(path))
        if path.parent != self.root or not path.is_dir():
            return False
        doomed = Path(tempfile.mkdtemp(prefix=DELETED_PREFIX, dir=self.root))
        os.rename(path, doomed / path.name)  # gone from the store in one step; rmtree may take a while
        shutil.rmtree(doomed, ignore_errors=True)
        return True


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
