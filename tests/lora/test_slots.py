"""How a slot is filled, in float32, bf16 or fp16 (what LoRAConfig.lora_dtype resolves to: tests/engine/test_resolve.py)."""

from __future__ import annotations

import pytest
import torch

from lora_serve.lora.lora_model import LoRAWeights
from lora_serve.lora.slots import ProjectionSlots
from lora_serve.model.linear import Linear

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_a_slot_holds_each_adapter_at_its_own_rank_rounded_once_with_the_scale_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    linear = Linear(32, {"q_proj": 24, "k_proj": 8, "v_proj": 8}, bias=False, dtype=torch.float32, device=CPU)
    slots = ProjectionSlots(linear, CPU, dtype)
    q = LoRAWeights(torch.randn(5, 32, generator=g), torch.randn(24, 5, generator=g), 0.3)
    v = LoRAWeights(torch.randn(3, 32, generator=g), torch.randn(8, 3, generator=g), 1.7)
    slots.fill(2, [q, None, v])
    entry = slots.entries[2]
    assert slots.entries[:2] == [None, None]
    assert entry.A.dtype == dtype and entry.A.shape == (8, 32)  # 5 + 3 rows: nothing padded to a max rank
    assert torch.equal(entry.A, torch.cat([q.A, v.A]).to(dtype))
    assert entry.signature == ((0, 0, 5), (2, 5, 8))
    for (out, r0, r1, b, scale), w, cols in zip(entry.layout, (q, v), (slice(0, 24), slice(32, 40))):
        assert (out, r1 - r0, scale) == (cols, w.A.shape[0], w.scale)
        assert torch.equal(b, w.B.to(dtype))  # the adapter's own B, rounded once; the scale is applied in float32
    assert torch.equal(entry.scales, torch.tensor([[0.3] * 5 + [1.7] * 3]))
    slots.clear(2)
    assert slots.entries[2] is None


def test_a_fill_with_no_targeted_slice_leaves_the_slot_empty():
    linear = Linear(16, {"o_proj": 16}, bias=False, dtype=torch.float32, device=CPU)
    slots = ProjectionSlots(linear, CPU)
    slots.fill(3, [None])
    assert slots.entries == [None] * 4
