"""One JSON access-log line per request, with model and tokens, and never the key or the prompt."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer, live_server

KEY = "sk-secret-key-123"
PROMPT = "my private prompt text"


@pytest.fixture(scope="module")
def keyed(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(tiny_engine, ServerConfig(served_model_name="tiny", api_key=KEY)) as live:
        yield live


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    # The line is written once the server has sent the last byte, a moment after the client has it.
    deadline = time.monotonic() + 2
    while not (lines := [r for r in caplog.records if r.name == "lora_serve.access"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [json.loads(r.getMessage()) for r in lines]


@pytest.mark.parametrize("stream", [False, True])
def test_one_json_line_per_request(keyed: LiveServer, caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    caplog.set_level(logging.INFO, logger="lora_serve.access")
    body = {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(keyed.base_url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200
    [line] = _access_lines(caplog)
    assert line["method"] == "POST" and line["path"] == "/v1/completions" and line["status"] == 200
    assert line["model"] == "tiny" and line["adapter"] is None
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 0 and line["duration_ms"] > 0
    assert KEY not in caplog.text and PROMPT not in caplog.text


def test_refusals_are_logged_with_their_status(keyed: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lora_serve.access")
    httpx.get(keyed.base_url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    [line] = _access_lines(caplog)
    assert (line["path"], line["status"]) == ("/v1/models", 401)
    assert "sk-wrong" not in caplog.text
