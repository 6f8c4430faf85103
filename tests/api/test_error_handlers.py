"""The error handlers on their own: loc -> param, and no traceback from an unexpected exception."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_serve.api.errors import install_error_handlers, param_from_loc


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "messages", 1, "content", "list[TextPart]", 0, "type"), "messages[1].content[0].type"),
        (("body", "stream"), "stream"),
        (("body", "prompt", "list[int]", 2), "prompt[2]"),
        (("body",), None),
        ((), None),
    ],
)
def test_param_from_loc(loc: tuple, param: str | None) -> None:
    assert param_from_loc(loc) == param


def test_unexpected_exception_is_500_without_details() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    resp = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}}
    assert "secret" not in resp.text and "Traceback" not in resp.text
