"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no input gives a 5xx or stops the server.

Schemathesis draws valid and invalid bodies, path and query values for every operation.
This bounded run (MAX_EXAMPLES per operation) is part of the suite; for a longer one:

    FUZZ_EXAMPLES=500 python -m pytest -q tests/hardening/test_fuzz.py
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import tiny_engine_with
from tests.api.live_server import LiveServer, live_server
from tests.hardening.conftest import ADAPTER

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# Short generations keep the run fast; the timeout turns a hang into a failing 504; the schema is fetched over HTTP.
FUZZ_CONFIG = ServerConfig(max_tokens_limit=4, request_timeout_s=20, api_docs="on")


@pytest.fixture(scope="module")
def fuzzed(tiny_llama_dir: Path, adapter_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # An engine of its own: fuzzed management calls may delete, merge or load adapters.
    adapter_dir = tmp_path_factory.mktemp("fuzz") / "adapters"
    shutil.copytree(adapter_src, adapter_dir / ADAPTER)
    with tiny_engine_with(tiny_llama_dir, adapter_dir) as engine, live_server(engine, FUZZ_CONFIG) as live:
        yield live


@pytest.fixture(scope="module")
def operations(fuzzed: LiveServer) -> dict[str, schemathesis.APIOperation]:
    api = schemathesis.openapi.from_url(fuzzed.base_url + "/openapi.json")
    return {op.label: op for op in (result.ok() for result in api.get_all_operations())}


def test_the_schema_has_every_route(operations: dict) -> None:
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "DELETE /v1/adapters/{name}"} <= set(operations)


def test_no_input_gives_a_5xx(operations: dict[str, schemathesis.APIOperation], fuzzed: LiveServer) -> None:
    # One Hypothesis run per operation (schemathesis' pytest plugin, from_fixture, fails under pytest 9).
    for label, operation in sorted(operations.items()):

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_5xx(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:500]}"  # noqa: B023 (run below)

        no_5xx()
        assert httpx.get(fuzzed.base_url + "/health").status_code == 200, f"unhealthy after fuzzing {label}"
