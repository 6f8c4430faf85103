"""Faults inside one process: an engine step that raises fails only its requests (500) and the server
keeps serving; a client that leaves frees its KV blocks and adapter pin; /health is 503 only for a dead engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import tiny_engine_with
from tests.api.live_server import LiveServer, live_server
from tests.api.test_disconnect import LONG, _wait_idle
from tests.hardening.conftest import ADAPTER


@pytest.fixture(scope="module")
def server(engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(engine, ServerConfig()) as live:
        yield live


def _break_next_step(monkeypatch: pytest.MonkeyPatch, engine: AsyncEngine) -> None:
    real_step = engine.engine.step

    def failing_once() -> list:
        monkeypatch.setattr(engine.engine, "step", real_step)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.engine, "step", failing_once)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_error_is_500_and_the_server_keeps_serving(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    _break_next_step(monkeypatch, server.engine)
    body = {"prompt": "hi", "model": ADAPTER, "max_tokens": 4, "stream": stream}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 500
    assert resp.json()["error"] == {
        "message": "engine error: RuntimeError", "type": "server_error", "param": None, "code": None
    }
    assert server.engine.lora._pins.count(0) == len(server.engine.lora._pins)
    assert httpx.get(server.base_url + "/health").status_code == 200
    resp = httpx.post(server.base_url + "/v1/completions", json={**body, "stream": False}, timeout=30)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_frees_kv_and_adapter_pin(server: LiveServer, stream: bool) -> None:
    body = {"prompt": "hi", "model": ADAPTER, "stream": stream, **LONG}
    if stream:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["model"] == ADAPTER
            assert sum(server.engine.lora._pins) == 1
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3))
    _wait_idle(server.engine)
    assert server.engine.lora._pins.count(0) == len(server.engine.lora._pins)
    assert server.engine.engine.kv_cache.usage == 0.0


def _kill_loop(monkeypatch: pytest.MonkeyPatch, engine: AsyncEngine) -> None:
    """The next step raises, and so does the recovery from it: the engine thread dies."""

    def broken(*_args: object) -> list:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.engine, "step", broken)
    monkeypatch.setattr(engine.engine, "fail_all", broken)


def test_health_is_503_only_once_the_engine_is_dead(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tiny_engine_with(tiny_llama_dir, tmp_path) as engine, live_server(engine, ServerConfig()) as live:
        assert httpx.get(live.base_url + "/health").status_code == 200
        _kill_loop(monkeypatch, engine)
        # The request in flight when the loop dies fails at once, not at its timeout.
        resp = httpx.post(live.base_url + "/v1/completions", json={"prompt": "hi", **LONG}, timeout=10)
        assert resp.status_code == 500 and resp.json()["error"]["message"] == "engine died: RuntimeError"
        assert httpx.get(live.base_url + "/health").status_code == 503
        resp = httpx.post(live.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
