"""Fixtures for the hardening tests: a tiny engine with one stored adapter, and a saved copy of that adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_serve.engine.async_engine import AsyncEngine
from tests.api.adapter_helpers import TINY_ADAPTERS, make_tiny_adapters, tiny_engine_with

ADAPTER = "r4-attn"


@pytest.fixture(scope="package")
def adapter_src(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the tiny Llama."""
    out = tmp_path_factory.mktemp("hardening-src")
    _, paths = make_tiny_adapters(tiny_llama_dir, out, {ADAPTER: TINY_ADAPTERS[ADAPTER]})
    return paths[ADAPTER]


@pytest.fixture(scope="package")
def engine(tiny_llama_dir: Path, adapter_src: Path) -> Iterator[AsyncEngine]:
    """Serves the base and ADAPTER (registered from adapter_dir at start)."""
    with tiny_engine_with(tiny_llama_dir, adapter_src.parent) as engine:
        yield engine
