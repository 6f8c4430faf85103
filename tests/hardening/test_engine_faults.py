"""Faults inside one process: an engine step that raises fails only its requests (500) and the server
keeps serving; a client that leaves frees its KV blocks and adapter pin; a request that fails or is
cancelled after its adapter is acquired releases it; /health is 503 only for a dead engine."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from lora_serve.engine.sampling_params import SamplingParams
from tests.api.adapter_helpers import tiny_engine_with
from tests.api.live_server import LiveServer, live_server
from tests.api.test_disconnect import LONG, _wait_idle, leave_once_running
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
def test_engine_error_is_500_and_the_server_keeps_serving(server: LiveServer, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    _break_next_step(monkeypatch, server.engine)
    body = {"prompt": "hi", "model": ADAPTER, "max_tokens": 4, "stream": stream}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 500
    assert resp.json()["error"] == {"message": "engine error: RuntimeError", "type": "server_error", "param": None, "code": None}
    assert server.engine.engine.lora.residency.num_pins() == 0
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
            assert server.engine.engine.lora.residency.num_pins() == 1
    else:
        leave_once_running(server, "/v1/completions", body)
    _wait_idle(server.engine)
    assert server.engine.engine.lora.residency.num_pins() == 0
    assert server.engine.engine.kv_cache.usage == 0.0


def test_a_request_refused_after_its_adapter_is_acquired_releases_it(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that fails in add_request after the acquire (as a seed past torch's range once did) frees it."""
    scheduler = server.engine.engine.scheduler
    real_add = scheduler.add

    def failing_once(seq: object) -> None:
        monkeypatch.setattr(scheduler, "add", real_add)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(scheduler, "add", failing_once)
    body = {"prompt": "hi", "model": ADAPTER, "max_tokens": 2}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["message"] == "injected fault"
    assert server.engine.adapters.num_refs(ADAPTER) == 0
    assert httpx.post(server.base_url + "/v1/completions", json=body, timeout=30).status_code == 200


def test_a_request_cancelled_while_its_adapter_loads_releases_it(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loading thread cannot be interrupted: the reference it takes after the cancel is released."""
    lora, real_acquire = engine.adapters, engine.adapters.acquire
    loading, may_load, loaded = threading.Event(), threading.Event(), threading.Event()

    def gated_acquire(name: str, *args):
        loading.set()
        may_load.wait(10)
        record = real_acquire(name, *args)
        loaded.set()
        return record

    monkeypatch.setattr(lora, "acquire", gated_acquire)

    async def cancel_while_loading() -> None:
        outputs = engine.generate("cancelled-while-loading", [5, 6, 7], SamplingParams(max_tokens=2), lora_name=ADAPTER)
        first = asyncio.ensure_future(anext(outputs))
        await asyncio.to_thread(loading.wait, 10)
        first.cancel()  # a client gone or a deadline passed while the adapter loads
        with pytest.raises(asyncio.CancelledError):
            await first
        may_load.set()
        await asyncio.to_thread(loaded.wait, 10)
        for _ in range(100):  # the release runs on this loop once the thread is done
            if lora.num_refs(ADAPTER) == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(cancel_while_loading())
    assert loaded.is_set() and lora.num_refs(ADAPTER) == 0
    assert engine.num_running() + engine.num_waiting() == 0


def _kill_loop(monkeypatch: pytest.MonkeyPatch, engine: AsyncEngine) -> None:
    """The next step raises, and so does the recovery from it: the engine thread dies."""

    def broken(*_args: object) -> list:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.engine, "step", broken)
    monkeypatch.setattr(engine.engine, "fail_all", broken)


def test_health_is_503_only_once_the_engine_is_dead(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tiny_engine_with(tiny_llama_dir, tmp_path) as engine, live_server(engine, ServerConfig()) as live:
        assert httpx.get(live.base_url + "/health").status_code == 200
        _kill_loop(monkeypatch, engine)
        # The request in flight when the loop dies fails at once, not at its timeout.
        resp = httpx.post(live.base_url + "/v1/completions", json={"prompt": "hi", **LONG}, timeout=10)
        assert resp.status_code == 500 and resp.json()["error"]["message"] == "engine died: RuntimeError"
        assert httpx.get(live.base_url + "/health").status_code == 503
        resp = httpx.post(live.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
