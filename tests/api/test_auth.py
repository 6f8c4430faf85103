"""--api-key: Bearer auth on /v1/*, 401 in the OpenAI shape; /health stays open."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.live_server import LiveServer, live_server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def keyed_server(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with live_server(tiny_engine, ServerConfig(served_model_name="tiny", api_key=KEY)) as live:
        yield live


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
    ids=["none", "wrong-key", "no-scheme", "basic-scheme"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/v1/chat/completions", "/v1/completions"])
def test_rejected_without_the_key(keyed_server: LiveServer, headers: dict, route: str) -> None:
    method = httpx.get if route == "/v1/models" else httpx.post
    kwargs = {} if route == "/v1/models" else {"json": {"prompt": "hi", "messages": []}}
    resp = method(keyed_server.base_url + route, headers=headers, **kwargs)
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


def test_openai_client_with_and_without_key(keyed_server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()
    resp = keyed_server.client(api_key=KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_health_is_open(keyed_server: LiveServer) -> None:
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/version").status_code == 200
