"""Which LoRA ops a device gets, and that the choice is logged with its reason; triton stays optional."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import lora_serve.lora.ops
from lora_serve.lora.ops import selector
from lora_serve.lora.ops.torch_ops import SegmentedLoRABatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def no_triton(monkeypatch):
    """As on a machine without triton: importing it fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("triton_ops", "triton_kernels"):  # forget them, had another test imported them
        monkeypatch.delitem(sys.modules, f"lora_serve.lora.ops.{name}", raising=False)
        monkeypatch.delattr(lora_serve.lora.ops, name, raising=False)


def test_cpu_gets_torch_even_with_the_interpreter_on(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with caplog.at_level(logging.INFO, logger=selector.__name__):
        assert selector.lora_batch_class(CPU) is SegmentedLoRABatch
    assert "LoRA ops: torch backend on cpu (CPU)" in caplog.text


def test_cuda_without_triton_falls_back_to_torch_and_says_why(no_triton, caplog):
    with caplog.at_level(logging.INFO, logger=selector.__name__):
        assert selector.lora_batch_class(CUDA) is SegmentedLoRABatch
    assert "LoRA ops: torch backend on cuda (triton does not import" in caplog.text


@pytest.mark.parametrize(
    "device,interpret,missing,message",
    [
        (CPU, False, False, "needs a CUDA device"),
        (CUDA, False, True, "triton does not import"),
    ],
    ids=["cpu-without-interpreter", "cuda-without-triton"],
)
def test_asking_for_triton_where_it_cannot_run_is_an_error(request, monkeypatch, device, interpret, missing, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if missing:
        request.getfixturevalue("no_triton")
    with pytest.raises(ValueError, match=message):
        selector.lora_batch_class(device, "triton")


def test_triton_on_cpu_tensors_under_the_interpreter(monkeypatch, caplog):
    pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
    from lora_serve.lora.ops.triton_ops import TritonLoRABatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with caplog.at_level(logging.INFO, logger=selector.__name__):
        assert selector.lora_batch_class(CPU, "triton") is TritonLoRABatch
    assert "LoRA ops: triton backend on cpu (interpreter)" in caplog.text


def test_torch_when_asked_for_on_cuda(caplog):
    with caplog.at_level(logging.INFO, logger=selector.__name__):
        assert selector.lora_batch_class(CUDA, "torch") is SegmentedLoRABatch
    assert "torch backend on cuda (asked for)" in caplog.text
