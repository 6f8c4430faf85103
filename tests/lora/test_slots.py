"""Slot dtype: what LoRAConfig.lora_dtype resolves to, and how a bf16/fp16 slot is filled."""

from __future__ import annotations

import pytest
import torch

from lora_serve.lora.lora_model import LoRAWeights
from lora_serve.lora.slots import ProjectionSlots, resolve_lora_dtype
from lora_serve.model.linear import Linear

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: no GPU is touched


@pytest.mark.parametrize(
    ("name", "device", "base", "expected"),
    [
        ("auto", CPU, torch.float32, torch.float32),
        ("auto", CPU, torch.bfloat16, torch.float32),  # small bf16 matmuls are slow on CPU
        ("auto", CUDA, torch.bfloat16, torch.bfloat16),
        ("auto", CUDA, torch.float16, torch.float16),
        ("auto", CUDA, torch.float32, torch.float32),
        ("float32", CUDA, torch.bfloat16, torch.float32),
        ("bfloat16", CPU, torch.float32, torch.bfloat16),
        ("float16", CUDA, torch.bfloat16, torch.float16),
    ],
)
def test_lora_dtype_resolves_per_device_and_base(name, device, base, expected):
    assert resolve_lora_dtype(name, device, base) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_slots_fold_the_scale_in_float32_then_round_once(dtype):
    g = torch.Generator().manual_seed(0)
    linear = Linear(32, {"q_proj": 24, "k_proj": 8}, bias=False, dtype=torch.float32, device=CPU)
    slots = ProjectionSlots(linear, 3, 8, CPU, dtype)
    q = LoRAWeights(torch.randn(5, 32, generator=g), torch.randn(24, 5, generator=g), 0.3)
    k = LoRAWeights(torch.randn(3, 32, generator=g), torch.randn(8, 3, generator=g), 1.7)
    slots.fill(1, [q, k])
    assert slots.A.dtype == dtype and all(b.dtype == dtype for b in slots.B)
    assert torch.equal(slots.A[1, :8], torch.cat([q.A, k.A]).to(dtype))
    for b, w in zip(slots.B, (q, k)):
        r = w.A.shape[0]
        assert torch.equal(b[1, :, :r], (w.B * w.scale).to(dtype))  # not w.B rounded, scaled, rounded again
        assert not b[1, :, r:].any()
    assert not slots.A[[0, 2]].any() and not slots.A[1, 8:].any()
