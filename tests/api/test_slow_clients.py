"""Slow clients (slowloris): a request head that does not arrive within header_timeout_s closes the
connection; a body that stops arriving for body_timeout_s gets 408 and the connection is closed; others
are served meanwhile. Raw sockets, since an HTTP client library never sends half a request."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from lora_serve.api.server import build_server
from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer, live_server

TIMEOUT_S = 1.0
WAIT_S = 20  # how long the test waits for the server to act: far past TIMEOUT_S, it only bounds a failure


@pytest.fixture(scope="module")
def server(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    config = ServerConfig(served_model_name="tiny", header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S)
    with live_server(tiny_engine, config) as live:
        yield live


def _connect(server: LiveServer) -> socket.socket:
    url = urlparse(server.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=WAIT_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def _serves_others(server: LiveServer) -> None:
    reply = server.client().completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"],
    ids=["nothing", "half-a-head"],
)
def test_a_head_that_does_not_arrive_closes_the_connection(server: LiveServer, sent: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(sent)
        _serves_others(server)
        raw = _read_until_closed(sock)
    if sent:
        status, headers, body = _response(raw)
        assert (status, headers["connection"], body["error"]["code"]) == (408, "close", "header_timeout")
    else:
        assert raw == b""  # nothing asked, nothing answered


def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_head(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        status, _, body = _response(_read_until_closed(sock))
    assert (status, body["error"]["code"]) == (408, "header_timeout")


@pytest.mark.parametrize(
    ("path", "content_type", "partial"),
    [
        ("/v1/completions", "application/json", b'{"model": "tiny", "pro'),
        ("/v1/adapters", "multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="name"\r\n'),
    ],
    ids=["json", "upload"],
)
def test_a_body_that_stops_arriving_is_408(server: LiveServer, path: str, content_type: str, partial: bytes) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(head.encode() + partial)
        _serves_others(server)
        status, headers, body = _response(_read_until_closed(sock))
    assert (status, headers["connection"]) == (408, "close")
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "body_timeout")
    _serves_others(server)


def test_no_timeouts_keeps_uvicorns_own_protocol(tiny_engine: AsyncEngine) -> None:
    config = ServerConfig(header_timeout_s=None, body_timeout_s=None)
    assert build_server(tiny_engine, config).config.http == "auto"
