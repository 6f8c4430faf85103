"""AdapterStore: uploads appear whole or not at all, names never escape the store, crashes leave
nothing, and a store opening beside live uploads (servers sharing one folder) leaves them alone."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lora_serve.lora.errors import AdapterExistsError, InvalidAdapterError
from lora_serve.lora.store import LOCK_FILE, UPLOAD_PREFIX, AdapterStore

# Another process's upload: it holds the flock of <folder>/.lock, as AdapterStore.save does, until killed.
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"}


def _streams() -> dict[str, io.BytesIO]:
    return {name: io.BytesIO(data) for name, data in FILES.items()}


def _accept(path: Path) -> str:
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES  # validated before it is published
    assert path.parent.name.startswith(UPLOAD_PREFIX)
    return "model"


def _refuse(path: Path) -> str:
    raise InvalidAdapterError("bad weights", param="adapter_model")


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_leftovers_of_a_crash_are_removed_on_open(tmp_path: Path) -> None:
    for name in (".upload-abc", ".deleted-xyz", "kept", ".other"):
        (tmp_path / name).mkdir()
    (tmp_path / ".upload-abc" / "adapter_model.safetensors").write_bytes(b"half")
    AdapterStore(tmp_path)
    assert _entries(tmp_path) == [".other", "kept"]


def test_open_leaves_another_process_upload_until_it_dies(tmp_path: Path) -> None:
    leftover = tmp_path / f"{UPLOAD_PREFIX}other"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(leftover / LOCK_FILE)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"locked\n"
        AdapterStore(tmp_path)  # another server opening the shared store: the upload's owner is alive
        assert _entries(tmp_path) == [leftover.name]
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel releases a dead process's flocks
        proc.wait(timeout=10)
    AdapterStore(tmp_path)
    assert _entries(tmp_path) == []


def test_open_leaves_an_upload_in_progress_and_removes_a_dead_one(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    validating, go_on = threading.Event(), threading.Event()
    saved: list[tuple[Path, str]] = []

    def slow(path: Path) -> str:
        validating.set()
        assert go_on.wait(timeout=10)
        return "model"

    upload = threading.Thread(target=lambda: saved.append(store.save("mine", _streams(), slow)))
    upload.start()
    assert validating.wait(timeout=10)
    live = _entries(tmp_path)
    (tmp_path / f"{UPLOAD_PREFIX}dead").mkdir()  # a crashed upload's folder: no lock file, nobody holds one
    AdapterStore(tmp_path)
    assert _entries(tmp_path) == live
    go_on.set()
    upload.join(timeout=10)
    assert saved == [(tmp_path.resolve() / "mine", "model")]
    assert _entries(tmp_path) == ["mine"]


def test_open_creates_the_folder(tmp_path: Path) -> None:
    AdapterStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_save_publishes_a_validated_folder(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    path, model = store.save("mine", _streams(), _accept)
    assert (path, model) == (tmp_path.resolve() / "mine", "model")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    assert _entries(tmp_path) == ["mine"]
    assert store.is_managed(path)


def test_refused_upload_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError):
        AdapterStore(tmp_path).save("mine", _streams(), _refuse)
    assert _entries(tmp_path) == []


def test_existing_name_is_409_and_untouched(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.save("mine", _streams(), _accept)
    (tmp_path / "mine" / "adapter_model.safetensors").write_bytes(b"original")
    with pytest.raises(AdapterExistsError):
        store.save("mine", _streams(), _accept)
    assert (tmp_path / "mine" / "adapter_model.safetensors").read_bytes() == b"original"
    assert _entries(tmp_path) == ["mine"]


def test_name_taken_while_validating_is_409(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)

    def racing(path: Path) -> str:  # another upload of the same name lands first
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "adapter_model.safetensors").write_bytes(b"first")
        return "model"

    with pytest.raises(AdapterExistsError):
        store.save("mine", _streams(), racing)
    assert _entries(tmp_path) == ["mine"]
    assert (tmp_path / "mine" / "adapter_model.safetensors").read_bytes() == b"first"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "/etc", "link"])
def test_names_never_leave_the_store(tmp_path: Path, name: str) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    store = AdapterStore(root)
    os.symlink(outside, root / "link")
    with pytest.raises(InvalidAdapterError):
        store.folder(name)
    with pytest.raises(InvalidAdapterError):
        store.save(name, _streams(), _accept)
    assert _entries(outside) == []
    assert _entries(root) == ["link"]


@pytest.mark.parametrize("name", [".upload-x", ".deleted-x", ".lock", ".tenant", ".hidden"])
def test_the_stores_own_dot_names_are_never_adapters(tmp_path: Path, name: str) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(InvalidAdapterError):
        store.save(name, _streams(), _accept)
    assert _entries(tmp_path) == []


def test_usage_counts_a_tenants_stored_files(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for name, tenant in [("a", "acme"), ("b", "acme"), ("g", "globex"), ("nobody", None)]:
        owner = {} if tenant is None else {".tenant": io.BytesIO(tenant.encode())}
        store.save(name, {**_streams(), **owner}, lambda path: "model")
    (tmp_path / ".upload-crashed").mkdir()
    size = sum(map(len, FILES.values()))  # the .tenant file is not counted
    assert (store.usage("acme"), store.usage("globex"), store.usage("initech")) == ((2, 2 * size), (1, size), (0, 0))


def test_remove_deletes_only_managed_folders(tmp_path: Path) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    (outside / "theirs").mkdir(parents=True)
    store = AdapterStore(root)
    path, _ = store.save("mine", _streams(), _accept)
    assert not store.remove(outside / "theirs")
    assert not store.remove(root / "missing")
    assert (outside / "theirs").is_dir()
    assert store.remove(path)
    assert _entries(root) == []
