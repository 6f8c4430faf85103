"""Reading an adapter's files only from inside given directories, symlinks resolved on the file opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_serve.lora.errors import ForbiddenPathError
from lora_serve.lora.files import read_bytes

# id -> (path under root, whether root is the confinement, bytes read or None: refused); out/ lies beside root.
CASES = {
    "file inside": ("file", True, b"in"),
    "link to a file inside": ("link-in", True, b"in"),
    "link to a file outside": ("link-out", True, None),
    "file under a folder linked outside": ("dir-out/data", True, None),
    "link outside, no roots": ("link-out", False, b"out"),
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    (root / "file").write_bytes(b"in")
    (out / "data").write_bytes(b"out")
    os.symlink(root / "file", root / "link-in")
    os.symlink(out / "data", root / "link-out")
    os.symlink(out, root / "dir-out")
    return root


@pytest.mark.parametrize(("name", "confined", "expected"), CASES.values(), ids=CASES.keys())
def test_read_bytes(root: Path, name: str, confined: bool, expected: bytes | None) -> None:
    roots = [Path(os.path.realpath(root))] if confined else None
    if expected is None:
        with pytest.raises(ForbiddenPathError) as info:
            read_bytes(root / name, roots)
        assert (info.value.status, info.value.param) == (403, "lora_path")
    else:
        assert read_bytes(root / name, roots) == expected


def test_no_roots_given_means_nowhere(root: Path) -> None:
    with pytest.raises(ForbiddenPathError):
        read_bytes(root / "file", [])
