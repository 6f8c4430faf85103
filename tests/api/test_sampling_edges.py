"""Sampling values at the edge of float range are served, not turned into NaN probabilities (found by the fuzz run)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.live_server import LiveServer


@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 5e-324},
        {"top_p": 1e-9},
        {"temperature": 5e-324},
        {"temperature": 1e-30},
        {"temperature": 1e-30, "top_p": 5e-324, "top_k": 1},
    ],
    ids=["top_p-denormal", "top_p-tiny", "temperature-denormal", "temperature-tiny", "all-tiny"],
)
def test_tiny_temperature_and_top_p_are_served(server: LiveServer, params: dict) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **params}
    resp = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    greedy = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "temperature": 0, "top_p": 1})
    assert resp.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
