"""Reading an adapter's files, optionally only from inside given directories.

An adapter loaded by path (POST /v1/load_lora_adapter) must lie inside --allowed-lora-dir, and
so must every file read from it, each time it is read: a file that is a symlink out of those
directories is refused (403). The check is made on the file actually opened (on Linux
/proc/self/fd names it), so a link swapped in between a check and the read cannot redirect
the read. Links that stay inside (a Hugging Face cache's snapshots/ -> blobs/) are followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ForbiddenPathError

# None: no confinement (--lora-modules, --adapter-dir, uploads); else the real paths files must lie in.
Roots = Sequence[Path] | None


def inside(real: Path, roots: Sequence[Path]) -> bool:
    """`real` (symlinks resolved) is one of `roots` or below one of them."""
    return any(real == root or root in real.parents for root in roots)


def read_bytes(path: Path, roots: Roots = None) -> bytes:
    """The file's bytes; ForbiddenPathError (param lora_path) when `roots` are given and the file opened
    lies outside all of them."""
    with open(path, "rb") as f:
        if roots is not None and not inside(_opened_path(f.fileno(), path), roots):
            message = f"{path.name} of the adapter lies outside the directories adapters may be loaded from"
            raise ForbiddenPathError(message, param="lora_path")
        return f.read()


def _opened_path(fd: int, path: Path) -> Path:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # no /proc (macOS): where the path leads now
        return Path(os.path.realpath(path))
