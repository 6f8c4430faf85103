"""The LoRA ops class of a resolved backend (engine/resolve.py picks it); triton stays optional."""

from __future__ import annotations

import sys

import pytest

import lora_serve.lora.ops
from lora_serve.lora.ops import selector
from lora_serve.lora.ops.torch_ops import SegmentedLoRABatch


@pytest.fixture
def no_triton(monkeypatch):
    """As on a machine without triton: importing it fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("triton_ops", "triton_kernels"):  # forget them, had another test imported them
        monkeypatch.delitem(sys.modules, f"lora_serve.lora.ops.{name}", raising=False)
        monkeypatch.delattr(lora_serve.lora.ops, name, raising=False)


def test_torch() -> None:
    assert selector.lora_batch_class("torch") is SegmentedLoRABatch


def test_triton_when_it_imports() -> None:
    pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
    from lora_serve.lora.ops.triton_ops import TritonLoRABatch

    assert selector.lora_batch_class("triton") is TritonLoRABatch


def test_without_triton_it_says_why(no_triton) -> None:
    cls, why = selector.triton_batch_class()
    assert cls is None and why.startswith("triton does not import")
    with pytest.raises(ValueError, match="lora_backend=triton was asked for but triton does not import"):
        selector.lora_batch_class("triton")


def test_an_unresolved_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="resolved first"):
        selector.lora_batch_class("auto")
