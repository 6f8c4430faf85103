"""GET /v1/models, /health, /version, and the error shape of unknown routes."""

from __future__ import annotations

import httpx

from tests.api.conftest import TINY_MAX_MODEL_LEN
from tests.api.live_server import LiveServer


def test_models_list(server: LiveServer) -> None:
    (card,) = server.client().models.list().data
    assert card.id == server.model == "tiny"
    assert card.object == "model"
    assert card.owned_by == "lora-serve"
    extra = card.model_extra
    assert extra["root"] == str(server.engine.model_path)
    assert extra["parent"] is None
    assert extra["max_model_len"] == TINY_MAX_MODEL_LEN


def test_model_field_may_be_omitted(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.json()["model"] == server.model


def test_health_and_version(server: LiveServer) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{server.base_url}/version").json()


def test_unknown_route_is_openai_shaped_404(server: LiveServer) -> None:
    resp = httpx.get(f"{server.base_url}/v1/nope")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "Invalid URL (GET /v1/nope)", "type": "invalid_request_error", "param": None, "code": None}}
