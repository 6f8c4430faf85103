"""A real S3 API on 127.0.0.1 for the s3:// adapter tests: moto's server (ThreadedMotoServer), in this process.

boto3 finds it as the server would find any S3-compatible store: AWS_ENDPOINT_URL and fake
credentials in the environment. What the store served is read from its own request log (werkzeug's
access lines), so a test counts the GetObjects it answered without looking inside the server under test.
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import settings as moto_settings
from moto.core.responses import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# werkzeug's access line: 127.0.0.1 - - [date] "GET /bucket/key?query HTTP/1.1" 200 -
REQUEST_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>[^ ?"]+)(?P<query>\?[^ "]*)? HTTP')


class RequestLog(logging.Handler):
    """The requests the store answered, as (method, path, query)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = REQUEST_RE.search(record.getMessage())
        if m:
            self.requests.append((m["method"], m["path"], m["query"] or ""))

    def get_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys read with GetObject (not listings) under bucket/prefix, in order."""
        start = f"/{bucket}/{prefix}"
        return [
            path[len(bucket) + 2 :] for method, path, query in self.requests if method == "GET" and path.startswith(start) and not query
        ]


@dataclass
class LocalS3:
    endpoint: str
    client: Any  # a boto3 S3 client of the test's own
    log: RequestLog = field(default_factory=RequestLog)

    def new_bucket(self) -> str:
        name = f"adapters-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put_adapter(self, bucket: str, prefix: str, folder: Path, files: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)) -> str:
        """Upload the adapter folder's files under bucket/prefix; its s3:// URL."""
        for name in files:
            self.client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(folder / name).read_bytes())
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str) -> list[tuple[str, str]]:
        """(key, ETag) of every object in the bucket."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted((o["Key"], o["ETag"]) for page in pages for o in page.get("Contents", []))


@contextmanager
def local_s3() -> Iterator[LocalS3]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    handler = RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(handler)
    werkzeug.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                mp.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(name, raising=False)
            yield LocalS3(endpoint, boto3.session.Session().client("s3"), handler)
    finally:
        werkzeug.removeHandler(handler)
        server.stop()


@contextmanager
def credentials_refused() -> Iterator[None]:
    """The store checks credentials (moto's IAM emulation) and knows none of ours: every call is a 403."""
    before = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    try:
        yield
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = before
