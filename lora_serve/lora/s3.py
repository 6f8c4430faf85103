"""Adapters in S3 or an S3-compatible store (MinIO, Ceph, R2...): s3://bucket/prefix, read with boto3.

    s3://bucket/adapters/sql/adapter_config.json         an adapter folder is a prefix holding the two
    s3://bucket/adapters/sql/adapter_model.safetensors   files PEFT's save_pretrained writes
    <adapter_cache_dir>/<digest>/                         its local copy; digest of (endpoint, bucket, key, ETag) x 2
    <adapter_cache_dir>/.download-k3j9x/                  a download in progress (a crash's: removed after an hour)

boto3 reads the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, instance roles...),
AWS_ENDPOINT_URL for an S3-compatible store among it. One ListObjectsV2 of the prefix gives both files'
sizes and ETags: an adapter over max_adapter_bytes is refused before any byte is read, and one whose
copy is cached already is not read again (the same objects have the same ETags). Otherwise each file is
streamed with GetObject (If-Match its listed ETag, so the two files are the ones listed) into a
download folder, counted against the limit as it comes, validated there (the caller's `validate`, as
an upload is), and renamed into the cache only when whole and valid: a refused adapter leaves nothing.
Object keys never become local paths: the cache folder is named by a digest, the files by their
fixed names. Pickled weights are never downloaded. Concurrent fetches of one prefix download once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..lora_config import S3_SCHEME as SCHEME
from .errors import (
    AdapterChangedError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    ForbiddenPathError,
    InvalidAdapterError,
    SourceUnavailableError,
    UnsupportedMediaError,
)
from .lora_model import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE

DOWNLOAD_PREFIX = ".download-"
CHUNK_BYTES = 1 << 20  # GetObject's body is read (and counted) a MiB at a time
# A download folder nothing was written to for this long was left by a crash; a live download (here or in
# another process sharing the cache) writes a MiB at a time, touching its file.
STALE_DOWNLOAD_S = 3600
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules
MAX_PREFIX_CHARS = 900  # S3 keys are at most 1024 bytes; room for "/<adapter name>/adapter_model.safetensors"
# What S3 answers when it refuses the server's credentials or permissions, and when a bucket or key is missing.
REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled", "403"}
MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
T = TypeVar("T")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b": no leading, trailing or doubled "/", no "." or ".." segment

    @classmethod
    def parse(cls, url: str, param: str = "lora_path") -> S3Location:
        """s3://bucket[/prefix][/]; InvalidAdapterError (400, naming `param`) for anything else."""

        def bad(why: str) -> InvalidAdapterError:
            return InvalidAdapterError(f"{url!r} is not a valid s3:// location: {why}", param=param)

        if not url.startswith(SCHEME):
            raise bad(f"it must start with {SCHEME}")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise bad("the bucket name must be 3 to 63 lower-case letters, digits, '.' and '-'")
        prefix = prefix.removesuffix("/")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise bad(f"the prefix is longer than {MAX_PREFIX_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in prefix):
            raise bad("the prefix holds a control character or a lone surrogate (keys are UTF-8)")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise bad("the prefix has an empty, '.' or '..' segment")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    @property
    def folder_prefix(self) -> str:
        """The keys of what lies under it start with this."""
        return f"{self.prefix}/" if self.prefix else ""

    def child(self, name: str) -> S3Location:
        """The sub-folder `name` (a checked adapter name: one segment, no "/")."""
        return S3Location(self.bucket, self.folder_prefix + name)

    def inside(self, other: S3Location) -> bool:
        """`self` is `other` or lies under it (whole segments: s3://b/ab is not under s3://b/a)."""
        return self.bucket == other.bucket and (
            not other.prefix or self.prefix == other.prefix or self.prefix.startswith(other.folder_prefix)
        )


@dataclass(frozen=True)
class _Listed:
    key: str
    size: int
    etag: str


class S3Source:
    """Adapter folders under s3:// locations, copied into `cache_dir`. Thread-safe; every method blocks."""

    def __init__(self, cache_dir: Path, max_bytes: int, client_factory: Callable[[], Any] | None = None):
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.num_downloads = 0  # adapters downloaded (cache misses)
        self._client_factory = client_factory or _boto3_client
        self._client: Any = None
        self._lock = threading.Lock()
        self._fetching: dict[S3Location, tuple[threading.Lock, int]] = {}  # location -> (its lock, holders)
        self.remove_stale_downloads()

    def remove_stale_downloads(self, now: float | None = None) -> list[Path]:
        """Delete the download folders crashed processes left in the cache (nothing written for an hour)."""
        if not self.cache_dir.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for folder in self.cache_dir.glob(f"{DOWNLOAD_PREFIX}*"):
            try:
                newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
            except OSError:  # finished or removed meanwhile
                continue
            if now - newest > STALE_DOWNLOAD_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def fetch(self, loc: S3Location, validate: Callable[[Path], T]) -> tuple[Path, T | None]:
        """The local folder holding the adapter at `loc`, and what `validate` returned for a new download
        (None: the cached copy, unread here). Blocking: one listing, then at most two GetObjects."""
        with self._fetch_lock(loc):
            files = self._list_files(loc)
            digest = _digest(self._endpoint(), loc.bucket, [files[CONFIG_FILE], files[WEIGHTS_FILE]])
            cached = self.cache_dir / digest
            if (cached / CONFIG_FILE).is_file() and (cached / WEIGHTS_FILE).is_file():
                return cached, None
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=self.cache_dir))
            try:
                for name, listed in files.items():
                    self._download(loc, listed, staged / name)
                result = validate(staged)
                try:
                    os.rename(staged, cached)
                except OSError:  # another process sharing the cache put the same copy there first
                    pass
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            with self._lock:
                self.num_downloads += 1
            return cached, result

    def children(self, loc: S3Location) -> list[str]:
        """The names of the sub-folders directly under `loc` (one segment each), sorted."""
        names = []
        for page in self._pages(loc):
            names += [p["Prefix"][len(loc.folder_prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n)

    # --- S3 calls ----------------------------------------------------------------------------------

    def _list_files(self, loc: S3Location) -> dict[str, _Listed]:
        """The adapter's two files as listed; 404 for an empty prefix, 400/415 as a local folder missing one."""
        listed: dict[str, _Listed] = {}
        others: list[str] = []
        for page in self._pages(loc):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(loc.folder_prefix) :]
                if name in (CONFIG_FILE, WEIGHTS_FILE):
                    listed[name] = _Listed(obj["Key"], int(obj["Size"]), obj["ETag"])
                else:
                    others.append(name)
        if not listed and not others:
            raise AdapterNotFoundError(f"no adapter at {loc}: nothing is stored under that prefix", param="lora_path")
        if CONFIG_FILE not in listed:
            raise InvalidAdapterError(f"{CONFIG_FILE} not found under {loc}", param="adapter_config")
        if WEIGHTS_FILE not in listed:
            pickled = sorted(n for n in others if n.endswith(PICKLE_SUFFIXES))
            if pickled:
                msg = f"only {WEIGHTS_FILE} is accepted; pickled weights ({', '.join(pickled)}) are refused"
                raise UnsupportedMediaError(msg, param="adapter_model")
            raise InvalidAdapterError(f"{WEIGHTS_FILE} not found under {loc}", param="adapter_model")
        total = sum(f.size for f in listed.values())
        if total > self.max_bytes:
            raise self._too_large(loc, total)
        return listed

    def _download(self, loc: S3Location, listed: _Listed, target: Path) -> None:
        with self._s3_errors(loc):
            body = self._s3().get_object(Bucket=loc.bucket, Key=listed.key, IfMatch=listed.etag)["Body"]
            seen = 0
            with body, open(target, "wb") as out:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    seen += len(chunk)
                    if seen > listed.size or seen > self.max_bytes:  # more than listed: never past the limit
                        raise self._too_large(loc, seen)
                    out.write(chunk)
        if seen != listed.size:
            raise SourceUnavailableError(f"{loc}: {target.name} ended after {seen} of {listed.size} bytes", param="lora_path")

    def _pages(self, loc: S3Location) -> Iterator[dict]:
        with self._s3_errors(loc):
            paginator = self._s3().get_paginator("list_objects_v2")
            yield from paginator.paginate(Bucket=loc.bucket, Prefix=loc.folder_prefix, Delimiter="/")

    def _too_large(self, loc: S3Location, size: int) -> AdapterTooLargeError:
        return AdapterTooLargeError(
            f"the adapter at {loc} has at least {size} bytes, more than the server's max_adapter_bytes ({self.max_bytes})",
            param="lora_path",
        )

    @contextmanager
    def _s3_errors(self, loc: S3Location) -> Iterator[None]:
        """botocore's errors as AdapterErrors naming `loc` (never the credentials)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "NoSuchBucket":
                raise AdapterNotFoundError(f"bucket {loc.bucket!r} does not exist", param="lora_path") from None
            if code in MISSING:
                raise AdapterNotFoundError(f"no adapter at {loc}", param="lora_path") from None
            if code in REFUSED:
                raise ForbiddenPathError(f"the object store refused to let this server read {loc} ({code})", param="lora_path") from None
            if code == "PreconditionFailed":
                raise AdapterChangedError(f"the adapter at {loc} changed while it was read; load it again", param="lora_path") from None
            raise SourceUnavailableError(
                f"the object store failed to serve {loc}: {code} {error.get('Message', '')}", param="lora_path"
            ) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise ForbiddenPathError(f"no AWS credentials are configured on the server to read {loc}", param="lora_path") from None
        except BotoCoreError as exc:  # endpoint unreachable, timeouts, bad endpoint URL
            raise SourceUnavailableError(f"the object store could not be reached for {loc}: {exc}", param="lora_path") from None

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _endpoint(self) -> str:
        return str(self._s3().meta.endpoint_url)

    @contextmanager
    def _fetch_lock(self, loc: S3Location) -> Iterator[None]:
        """One fetch of `loc` at a time: the second finds the first's copy in the cache."""
        with self._lock:
            lock, holders = self._fetching.get(loc, (threading.Lock(), 0))
            self._fetching[loc] = (lock, holders + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, holders = self._fetching[loc]
                if holders == 1:
                    del self._fetching[loc]
                else:
                    self._fetching[loc] = (lock, holders - 1)


def _digest(endpoint: str, bucket: str, files: list[_Listed]) -> str:
    """The cache folder's name: the same objects (keys and ETags) in the same store give the same name."""
    identity = [endpoint, bucket, [(f.key, f.etag, f.size) for f in files]]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:40]


def _boto3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ModuleNotFoundError as exc:
        if exc.name not in ("boto3", "botocore"):
            raise
        raise SourceUnavailableError('s3:// adapter locations need boto3: pip install "lora-serve[s3]"', param="lora_path") from None
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)
