"""A client that leaves mid-request frees its sequence at once, streamed or not."""

from __future__ import annotations

import time

import httpx
import pytest

from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer

# 220 tokens take well over a second on the tiny model (about 6 ms a step on 2 cores), so a
# sequence gone within IDLE_WITHIN seconds of the disconnect was aborted, not finished.
LONG = {"max_tokens": 220, "ignore_eos": True, "temperature": 0}
IDLE_WITHIN = 0.75


def _wait_idle(engine: AsyncEngine, timeout: float = IDLE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running() + engine.num_waiting() > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds a sequence"
        time.sleep(0.02)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stream_closed_after_two_chunks(server: LiveServer, route: str) -> None:
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


def test_non_stream_client_timeout_aborts(server: LiveServer) -> None:
    body = {"prompt": "hi", **LONG}
    # A slow client: wait for the request to start, then give up on it.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3))
    _wait_idle(server.engine)


def test_server_still_serves_after_disconnects(server: LiveServer) -> None:
    resp = server.client().completions.create(model=server.model, prompt="hi", max_tokens=3)
    assert resp.usage.completion_tokens <= 3


def test_closing_a_stream_of_several_choices_aborts_them_all(server: LiveServer) -> None:
    body = {"prompt": ["hi", "there"], "n": 2, "stream": True, **LONG}
    with httpx.Client(base_url=server.base_url) as client, client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line.startswith("data: "))
        assert server.engine.num_running() == 4  # added together: all in the running batch
    _wait_idle(server.engine)
