"""GET /v1/models, /v1/models/{model}, /health, /version, and the error shape of unknown routes."""

from __future__ import annotations

import httpx
import openai
import pytest

from lora_serve.config import ServerConfig
from lora_serve.engine.async_engine import AsyncEngine
from tests.api.conftest import TINY_MAX_MODEL_LEN
from tests.api.live_server import LiveServer, live_server


def test_models_list(server: LiveServer) -> None:
    (card,) = server.client().models.list().data
    assert card.id == server.model == "tiny"
    assert card.object == "model"
    assert card.owned_by == "lora-serve"
    extra = card.model_extra
    assert extra["root"] == str(server.engine.model_path)
    assert extra["parent"] is None
    assert extra["max_model_len"] == TINY_MAX_MODEL_LEN


def test_retrieve_a_model_gives_its_card_from_the_list(server: LiveServer) -> None:
    client = server.client()
    assert client.models.retrieve("tiny") == client.models.list().data[0]


def test_retrieve_an_unknown_model_is_openai_shaped_404(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client().models.retrieve("nope")
    assert info.value.code == "model_not_found"
    error = httpx.get(f"{server.base_url}/v1/models/tiny:nope").json()
    assert error == {
        "error": {
            "message": "The model `tiny:nope` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_retrieve_a_base_id_that_holds_a_slash(tiny_engine: AsyncEngine) -> None:
    """--served-model-name org/name, as vLLM deployments name models: the openai client sends org%2Fname."""
    with live_server(tiny_engine, ServerConfig(served_model_name="org/tiny")) as live:
        assert live.client().models.retrieve("org/tiny").id == "org/tiny"
        assert httpx.get(f"{live.base_url}/v1/models/org/tiny").json()["id"] == "org/tiny"
        with pytest.raises(openai.NotFoundError):
            live.client().models.retrieve("org/other")


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
