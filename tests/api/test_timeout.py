"""request_timeout_s: a request past its deadline is aborted; 504 before the stream starts, an error event after."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer, live_server
from tests.api.test_disconnect import LONG, _wait_idle

TIMEOUT_S = 0.3
STEP_S = 0.005  # each engine step here lasts at least this: LONG's 220 steps, >= 1.1 s, outlast the deadline on any machine


@pytest.fixture(scope="module")
def hasty(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    engine = tiny_engine.engine
    step = engine.step

    def slow_step():  # the tiny model steps in ~1.3 ms on 2 cores: LONG alone could finish within the deadline
        time.sleep(STEP_S)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    try:
        with live_server(tiny_engine, ServerConfig(served_model_name="tiny", request_timeout_s=TIMEOUT_S)) as live:
            yield live
    finally:
        engine.step = step  # type: ignore[method-assign]


def test_non_stream_past_the_deadline_is_504_and_aborted(hasty: LiveServer) -> None:
    resp = httpx.post(hasty.base_url + "/v1/completions", json={"prompt": "hi", **LONG}, timeout=30)
    assert resp.status_code == 504
    assert resp.json()["error"] == {
        "message": f"the request did not finish within the server's request_timeout_s ({TIMEOUT_S} s) and was aborted",
        "type": "server_error",
        "param": None,
        "code": "request_timeout",
    }
    _wait_idle(hasty.engine)


def test_stream_past_the_deadline_ends_with_an_error_event_then_done(hasty: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **LONG}
    with httpx.stream("POST", hasty.base_url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    _wait_idle(hasty.engine)


def test_a_short_request_is_unaffected(hasty: LiveServer) -> None:
    resp = httpx.post(hasty.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert resp.status_code == 200
