"""--api-key: Bearer auth on /v1/*, 401 in the OpenAI shape; /health stays open; /metrics needs the
metrics key or an admin key once keys are configured; the API docs are off then unless asked for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
@pytest.mark.parametrize("route", ["/v1/models", "/v1/models/tiny", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_rejected_without_the_key(keyed_server: LiveServer, headers: dict, route: str) -> None:
    method = httpx.get if route.startswith("/v1/models") else httpx.post
    kwargs = {} if route.startswith("/v1/models") else {"json": {"prompt": "hi", "messages": []}}
    resp = method(keyed_server.base_url + route, headers=headers, **kwargs)
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


def test_openai_client_with_and_without_key(keyed_server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()
    assert keyed_server.client(api_key=KEY).models.retrieve("tiny").id == "tiny"
    resp = keyed_server.client(api_key=KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_health_is_open(keyed_server: LiveServer) -> None:
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/version").status_code == 200


# /metrics and the API docs, by configuration: an auth file of two tenants and an admin, beside the
# legacy keys and a metrics key. KEY (--api-key) is the admin only when no --admin-api-key is set.
ACME, GLOBEX, OPS, ADMIN, METRICS = "sk-acme-0001", "sk-globex-01", "sk-ops-admin", "sk-admin-key", "sk-metrics-1"
KEYS = [
    {"key": ACME, "tenant": "acme", "role": "user"},
    {"key": GLOBEX, "tenant": "globex", "role": "user"},
    {"key": OPS, "tenant": "ops", "role": "admin"},
]
TENANTS = {"auth_file": "keys.json", "api_key": KEY, "admin_api_key": ADMIN}
DOCS = ("/docs", "/redoc", "/openapi.json")


@contextmanager
def configured(engine: AsyncEngine, tmp_path: Path, **fields: object) -> Iterator[LiveServer]:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": KEYS}))
    if "auth_file" in fields:
        fields["auth_file"] = tmp_path / str(fields["auth_file"])
    with live_server(engine, ServerConfig(served_model_name="tiny", **fields)) as live:
        yield live


def _get(live: LiveServer, route: str, key: str | None = None) -> httpx.Response:
    return httpx.get(live.base_url + route, headers={} if key is None else {"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize(
    ("fields", "statuses"),
    [
        ({**TENANTS, "metrics_api_key": METRICS},
         {None: 401, "wrong": 401, ACME: 401, GLOBEX: 401, KEY: 401, OPS: 200, ADMIN: 200, METRICS: 200}),
        (TENANTS, {None: 401, ACME: 401, KEY: 401, OPS: 200, ADMIN: 200}),
        ({**TENANTS, "disable_metrics_auth": True}, {None: 200, ACME: 200}),
        ({"api_key": KEY}, {None: 401, "wrong": 401, KEY: 200}),
        ({"metrics_api_key": METRICS}, {None: 401, "wrong": 401, METRICS: 200}),
        ({}, {None: 200}),
    ],
    ids=["tenants+metrics-key", "tenants", "tenants+disable-metrics-auth", "api-key-only", "metrics-key-only", "no-keys"],
)  # fmt: skip
def test_metrics_need_the_metrics_key_or_an_admin_key(
    tiny_engine: AsyncEngine, tmp_path: Path, fields: dict, statuses: dict[str | None, int]
) -> None:
    with configured(tiny_engine, tmp_path, **fields) as live:
        got = {key: _get(live, "/metrics", key) for key in statuses}
    assert {key: resp.status_code for key, resp in got.items()} == statuses
    for resp in got.values():
        if resp.status_code == 401:
            assert resp.json()["error"]["code"] == "invalid_api_key"
        else:
            assert "vllm:num_requests_running" in resp.text


@pytest.mark.parametrize(
    ("fields", "served"),
    [
        (TENANTS, False),
        ({"api_key": KEY}, False),
        ({**TENANTS, "api_docs": "on"}, True),
        ({}, True),
        ({"api_docs": "off"}, False),
    ],
    ids=["tenants", "api-key-only", "tenants+on", "no-keys", "no-keys+off"],
)
def test_api_docs_are_off_once_keys_are_configured(tiny_engine: AsyncEngine, tmp_path: Path, fields: dict, served: bool) -> None:
    with configured(tiny_engine, tmp_path, **fields) as live:
        statuses = {route: _get(live, route, OPS).status_code for route in DOCS}
        schema = _get(live, "/openapi.json", OPS)
    assert statuses == dict.fromkeys(DOCS, 200 if served else 404)
    if served:
        assert "/v1/chat/completions" in schema.json()["paths"]
    else:
        assert schema.json()["error"]["message"] == "Invalid URL (GET /openapi.json)"


def test_the_metrics_key_opens_nothing_else(tiny_engine: AsyncEngine, tmp_path: Path) -> None:
    with configured(tiny_engine, tmp_path, **TENANTS, metrics_api_key=METRICS) as live:
        statuses = [_get(live, route, METRICS).status_code for route in ("/v1/models", "/v1/adapters", "/docs")]
    assert statuses == [401, 401, 404]
