"""A client that leaves mid-request frees its sequence at once, streamed or not."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer

# 220 tokens: a request still runs when its client leaves (a few hundred ms on the tiny model); the
# engine's aborts are recorded (`aborted`), so a request that finished instead fails the test.
LONG = {"max_tokens": 220, "ignore_eos": True, "temperature": 0}
IDLE_WITHIN = 0.75


@pytest.fixture
def aborted(server: LiveServer) -> Iterator[list[str]]:
    """Ids of the requests the engine ended early (aborted while waiting or running) during the test."""
    engine = server.engine.engine
    ids: list[str] = []
    original = engine.abort_request

    def record(request_id: str):
        out = original(request_id)
        if out is not None:
            ids.append(request_id)
        return out

    engine.abort_request = record  # type: ignore[method-assign]
    yield ids
    engine.abort_request = original  # type: ignore[method-assign]


def _wait_idle(engine: AsyncEngine, timeout: float = IDLE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running() + engine.num_waiting() > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds a sequence"
        time.sleep(0.02)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stream_closed_after_two_chunks(server: LiveServer, route: str, aborted: list[str]) -> None:
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if route == "/v1/chat/completions" else {"prompt": "hi"}
    body = {**prompt, "stream": True, **LONG}
    with httpx.Client(base_url=server.base_url) as client, client.stream("POST", route, json=body) as resp:
        assert resp.status_code == 200
        chunks = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 2:
                break
        assert server.engine.num_running() == 1
    _wait_idle(server.engine)
    assert len(aborted) == 1


def leave_once_running(server: LiveServer, path: str, body: dict) -> None:
    """A non-streamed client: it sends `body`, waits until the engine runs the request, then leaves."""
    data = json.dumps(body).encode()
    url = urlsplit(server.base_url)
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head.encode() + data)
        deadline = time.monotonic() + 5.0
        while server.engine.num_running() == 0:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.001)


def test_a_non_stream_client_that_gives_up_aborts_its_request(server: LiveServer, aborted: list[str]) -> None:
    leave_once_running(server, "/v1/completions", {"prompt": "hi", **LONG})
    _wait_idle(server.engine)
    assert len(aborted) == 1


def test_server_still_serves_after_disconnects(server: LiveServer) -> None:
    resp = server.client().completions.create(model=server.model, prompt="hi", max_tokens=3)
    assert resp.usage.completion_tokens <= 3


def test_closing_a_stream_of_several_choices_aborts_them_all(server: LiveServer, aborted: list[str]) -> None:
    body = {"prompt": ["hi", "there"], "n": 2, "stream": True, **LONG}
    with httpx.Client(base_url=server.base_url) as client, client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line.startswith("data: "))
        assert server.engine.num_running() == 4  # added together: all in the running batch
    _wait_idle(server.engine)
    assert len(aborted) == 4
