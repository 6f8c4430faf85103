"""s3:// adapter folders (lora/s3.py) against a real S3 API (moto's server): parsing, the ETag-keyed cache,
the size limit, and what each refusal leaves behind (nothing)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from lora_serve.lora.errors import (
    AdapterError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    ForbiddenPathError,
    InvalidAdapterError,
    SourceUnavailableError,
    UnsupportedMediaError,
)
from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE
from lora_serve.lora.s3 import S3Location, S3Source
from tests.lora.s3_helpers import LocalS3, credentials_refused

WEIGHTS_BYTES = 64 * 1024


def _folder(root: Path, seed: int, weights_bytes: int = WEIGHTS_BYTES) -> Path:
    """Two files named as an adapter's; their contents are random (S3Source copies bytes, validate() parses)."""
    root.mkdir(parents=True)
    (root / CONFIG_FILE).write_text(f'{{"seed": {seed}}}')
    (root / WEIGHTS_FILE).write_bytes(os.urandom(weights_bytes))
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    """What validate() sees in the staged folder: each file's sha256."""
    return {name: _sha(folder / name) for name in sorted(os.listdir(folder))}


def _cache_entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache)) if cache.is_dir() else []


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bkt", "bkt", ""),
        ("s3://bkt/", "bkt", ""),
        ("s3://bkt/a/b", "bkt", "a/b"),
        ("s3://bkt/a/b/", "bkt", "a/b"),
        ("s3://my.bucket-1/adapters/sql-lora", "my.bucket-1", "adapters/sql-lora"),
    ],
)
def test_parse(url: str, bucket: str, prefix: str) -> None:
    assert S3Location.parse(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "bkt/a",
        "S3://bkt/a",
        "s3://",
        "s3://ab/a",  # bucket names have 3 to 63 characters
        "s3://Bkt/a",  # lower case only
        "s3://bkt_1/a",
        "s3://a..b/a",
        "s3://bkt/a//b",
        "s3://bkt//a",
        "s3://bkt/a/../b",
        "s3://bkt/./a",
        "s3://bkt/a\x00b",
        "s3://bkt/a\nb",
        "s3://bkt/a\ud800b",  # JSON may carry a lone surrogate; no S3 key holds one
        "s3://bkt/" + "a" * 901,
    ],
)
def test_parse_refuses(url: str) -> None:
    with pytest.raises(InvalidAdapterError) as exc:
        S3Location.parse(url)
    assert exc.value.param == "lora_path"


@pytest.mark.parametrize(
    ("url", "allowed", "inside"),
    [
        ("s3://bkt/a/b", "s3://bkt/a", True),
        ("s3://bkt/a", "s3://bkt/a", True),
        ("s3://bkt/a/b", "s3://bkt", True),
        ("s3://bkt/ab/c", "s3://bkt/a", False),  # whole segments only
        ("s3://bkt/a", "s3://bkt/a/b", False),
        ("s3://other/a/b", "s3://bkt/a", False),
    ],
)
def test_inside(url: str, allowed: str, inside: bool) -> None:
    assert S3Location.parse(url).inside(S3Location.parse(allowed)) is inside


def test_a_download_is_validated_then_cached_by_etag(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    url = s3.put_adapter(bucket, "team/sql", _folder(tmp_path / "v1", seed=1))
    source = S3Source(tmp_path / "cache", max_bytes=1 << 20)
    seen: list[dict[str, str]] = []

    def validate(staged: Path) -> str:
        seen.append(_digests(staged))
        return "valid"

    path, result = source.fetch(S3Location.parse(url), validate)
    assert result == "valid" and seen == [_digests(tmp_path / "v1")]
    assert _digests(path) == _digests(tmp_path / "v1")
    assert s3.log.get_objects(bucket) == ["team/sql/adapter_config.json", "team/sql/adapter_model.safetensors"]

    again, result = source.fetch(S3Location.parse(url + "/"), validate)
    assert (again, result) == (path, None)  # the cached copy: nothing read from the store
    assert len(s3.log.get_objects(bucket)) == 2 and len(seen) == 1

    s3.put_adapter(bucket, "team/sql", _folder(tmp_path / "v2", seed=2))  # a new version under the same key
    newer, _ = source.fetch(S3Location.parse(url), validate)
    assert newer != path and _digests(newer) == _digests(tmp_path / "v2")
    assert _digests(path) == _digests(tmp_path / "v1")  # the old copy is left as it was: its registrations read it
    assert len(s3.log.get_objects(bucket)) == 4
    assert [e for e in _cache_entries(tmp_path / "cache") if e.startswith(".")] == []


def test_concurrent_fetches_of_one_adapter_download_it_once(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    url = s3.put_adapter(bucket, "shared", _folder(tmp_path / "a", seed=3, weights_bytes=4 << 20))
    source = S3Source(tmp_path / "cache", max_bytes=8 << 20)
    paths: list[Path] = []
    start = threading.Barrier(6)

    def fetch() -> None:
        start.wait()
        paths.append(source.fetch(S3Location.parse(url), _digests)[0])

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 6
    assert s3.log.get_objects(bucket, "shared/") == ["shared/adapter_config.json", "shared/adapter_model.safetensors"]


def _refused(source: S3Source, url: str) -> AdapterError:
    with pytest.raises(AdapterError) as exc:
        source.fetch(S3Location.parse(url), _digests)
    return exc.value


def test_refusals_read_and_leave_nothing(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    s3.put_adapter(bucket, "big", _folder(tmp_path / "big", seed=4, weights_bytes=(1 << 20) + 1))
    s3.put_adapter(bucket, "no-config", _folder(tmp_path / "nc", seed=5), files=(WEIGHTS_FILE,))
    s3.put_adapter(bucket, "no-weights", _folder(tmp_path / "nw", seed=6), files=(CONFIG_FILE,))
    s3.client.put_object(Bucket=bucket, Key="pickled/adapter_config.json", Body=b"{}")
    s3.client.put_object(Bucket=bucket, Key="pickled/adapter_model.bin", Body=b"\x80\x02")
    source = S3Source(tmp_path / "cache", max_bytes=1 << 20)
    cases = {
        f"s3://{bucket}/big": (AdapterTooLargeError, "lora_path"),
        f"s3://{bucket}/missing": (AdapterNotFoundError, "lora_path"),
        f"s3://no-such-bucket-{bucket}/x": (AdapterNotFoundError, "lora_path"),
        f"s3://{bucket}/no-config": (InvalidAdapterError, "adapter_config"),
        f"s3://{bucket}/no-weights": (InvalidAdapterError, "adapter_model"),
        f"s3://{bucket}/pickled": (UnsupportedMediaError, "adapter_model"),
    }
    for url, (error, param) in cases.items():
        exc = _refused(source, url)
        assert (type(exc), exc.param) == (error, param), url
    with credentials_refused():  # the store now refuses our keys
        exc = _refused(source, f"s3://{bucket}/big")
    assert isinstance(exc, ForbiddenPathError) and "testing" not in exc.message  # never the credentials
    assert s3.log.get_objects(bucket) == []  # every refusal came from the listing
    assert _cache_entries(tmp_path / "cache") == []


def test_an_invalid_download_leaves_nothing(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    url = s3.put_adapter(bucket, "bad", _folder(tmp_path / "bad", seed=7))
    source = S3Source(tmp_path / "cache", max_bytes=1 << 20)

    def refuse(staged: Path) -> None:
        raise InvalidAdapterError("not an adapter", param="adapter_model")

    with pytest.raises(InvalidAdapterError):
        source.fetch(S3Location.parse(url), refuse)
    assert _cache_entries(tmp_path / "cache") == []
    path, result = source.fetch(S3Location.parse(url), _digests)  # nothing was cached: read and validated again
    assert result == _digests(tmp_path / "bad") and path.is_dir()


def test_an_unreachable_store_is_a_502(s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    exc = _refused(S3Source(tmp_path / "cache", max_bytes=1 << 20), "s3://bkt/x")
    assert isinstance(exc, SourceUnavailableError) and exc.status == 502


def test_downloads_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    crashed, running = cache / ".download-crashed", cache / ".download-running"
    for folder in (crashed, running):
        folder.mkdir(parents=True)
        (folder / WEIGHTS_FILE).write_bytes(b"partial")
    old = os.stat(running).st_mtime - 2 * 3600
    for path in (crashed, crashed / WEIGHTS_FILE):
        os.utime(path, (old, old))
    (cache / "kept").mkdir()
    S3Source(cache, max_bytes=1 << 20)
    assert _cache_entries(cache) == [".download-running", "kept"]
