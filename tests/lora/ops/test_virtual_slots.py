"""Virtual slots (ProjectionSlots.fill_scaled): an adapter at a weight, read by every backend as any slot.

A composition's rows are one run covered by one segment per component, overlapping one another and
the merged adapter's negation; the result must be y0 + Σ_i w_i·s_i·(x·A_iᵀ)·B_iᵀ, checked in float64
against the adapters' own weights (random_slots.py), never read back from the slots.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lora_serve.lora.ops.torch_ops import SegmentedLoRABatch

from .random_slots import Terms, random_slots, reference

IN, SLICES = 48, {"q_proj": 32, "k_proj": 16, "v_proj": 16}
LAYOUTS = {0: {"q_proj": 16, "k_proj": 16, "v_proj": 16}, 1: {"q_proj": 4, "v_proj": 8}, 2: {"k_proj": 2}, 3: {"q_proj": 3, "v_proj": 7}}
# (virtual slot, source slot, weight)
VIRTUAL = [(4, 0, 0.7), (5, 1, -0.5), (6, 0, 2.5)]
# Rows 0-1: adapter 0 and 1 plainly; 2-4: 0.7·adapter 0 + -0.5·adapter 1; 5: 2.5·adapter 0 alone (a
# per-request scale); slot 3 plays the merged adapter's negation over every adapter row; rows 6-7: base.
SEGMENTS = [(0, 0, 1), (1, 1, 2), (4, 2, 5), (5, 2, 5), (6, 5, 6), (3, 0, 6)]
ROWS, ADAPTER_ROWS = 8, 6


def virtual_slots(slot_dtype=torch.float32, kernels=None):
    slots, terms = random_slots(IN, SLICES, LAYOUTS, 3, lambda slot: (-1) ** slot * (0.5 + slot), 1 / 4, slot_dtype, kernels)
    for virtual, source, weight in VIRTUAL:
        slots.fill_scaled(virtual, source, weight)
        terms[virtual] = [(cols, replace(w, scale=w.scale * weight)) for cols, w in terms[source]]
    return slots, terms


def check(batch_cls, slots, terms: Terms, tolerance: float) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(ROWS, IN, generator=g)
    y0 = torch.randn(ROWS, sum(SLICES.values()), generator=g)
    y = y0.clone()
    batch_cls(SEGMENTS).apply(slots, x, y)
    ref = reference(x, y0, SEGMENTS, terms)
    assert (y.double() - ref).abs().max().item() <= tolerance * (ref - y0.double()).abs().max().item()
    assert torch.equal(y[ADAPTER_ROWS:], y0[ADAPTER_ROWS:])


def test_virtual_entries_view_the_source_tensors():
    slots, _ = virtual_slots()
    for virtual, source, weight in VIRTUAL:
        v, s = slots.entries[virtual], slots.entries[source]
        assert v is not None and s is not None
        assert v.A.data_ptr() == s.A.data_ptr()  # no copy
        assert [b.data_ptr() for *_, b, _ in v.layout] == [b.data_ptr() for *_, b, _ in s.layout]
        torch.testing.assert_close(v.scales, s.scales * weight)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-segment"])
def test_torch_backend(grouped, monkeypatch):
    if not grouped:
        monkeypatch.setattr("lora_serve.lora.ops.torch_ops.MAX_SEGMENT_ROWS", 0)
    slots, terms = virtual_slots()
    check(SegmentedLoRABatch, slots, terms, 1e-5)


def test_cpu_kernels(kernels):
    slots, terms = virtual_slots(torch.float16, kernels)
    check(SegmentedLoRABatch, slots, terms, 2e-3)  # float16 weights: 2^-11 rounding


def test_triton_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lora_serve.lora.ops.triton_ops import TritonLoRABatch

    slots, terms = virtual_slots()
    check(TritonLoRABatch, slots, terms, 1e-5)


def test_a_cleared_source_clears_its_virtual_slot():
    slots, _ = virtual_slots()
    slots.clear(2)
    slots.fill_scaled(7, 2, 0.5)
    assert slots.entries[7] is None
