"""DoRA's per-row scale in every backend, against a float64 reference built from the raw weights.

Per row, in float64 (lora/dora.py, PEFT's DoraLinearLayer.forward; the merged negation per lora/merge.py):
    y = y0                                      the base output, bias included
    y = b + q ⊙ (y − b)                         rows under a merged DoRA adapter's negation (q = 1 / its ratio)
    y += Σ over the row's segments scale·(x·Aᵀ)·Bᵀ
    y = b + r ⊙ (y − b)                         rows of a DoRA adapter (r its ratio), on the slices it targets
Backends: torch per segment and grouped (stacked decode rows), torch with float16 slots read by the CPU
kernels, and the fused Triton kernels under triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from lora_serve.lora.lora_model import LoRAWeights
from lora_serve.lora.ops.torch_ops import SegmentedLoRABatch
from lora_serve.lora.slots import ProjectionSlots
from lora_serve.model.linear import Linear

IN, SLICES = 40, {"q_proj": 32, "k_proj": 16, "v_proj": 16}
OUT = sum(SLICES.values())

# slot -> ({slice: rank}, DoRA?). Slots 0 and 3 share a layout: their one-row decode segments are stacked.
LAYOUTS = {
    0: ({"q_proj": 4, "v_proj": 8}, True),
    1: ({"k_proj": 8}, False),
    2: ({"q_proj": 16, "k_proj": 4, "v_proj": 32}, True),
    3: ({"q_proj": 4, "v_proj": 8}, True),
}
MERGED = 4  # the negation of a merged DoRA adapter
MERGED_LAYOUT = {"q_proj": 8, "k_proj": 4}
SEGMENTS = [(0, 0, 1), (3, 1, 2), (1, 2, 5), (2, 5, 11)]  # then 2 base rows
ROWS = 13


def build(bias: bool, merged: bool, slot_dtype: torch.dtype, kernels=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    linear = Linear(IN, SLICES, bias=bias, dtype=torch.float32, device=torch.device("cpu"))
    if bias:
        linear.bias.data.copy_(torch.randn(OUT, generator=g))
    slots = ProjectionSlots(linear, torch.device("cpu"), slot_dtype, kernels)
    terms = {}  # slot -> [(out columns, weights)]

    def weights(ranks: dict[str, int], dora: bool, scale: float) -> list[LoRAWeights | None]:
        out = []
        for name, size in SLICES.items():
            if name not in ranks:
                out.append(None)
                continue
            A, B = torch.randn(ranks[name], IN, generator=g), torch.randn(size, ranks[name], generator=g) / 4
            # As the slots hold them, so that the reference sees the same weights.
            A, B = A.to(slot_dtype).float(), B.to(slot_dtype).float()
            ratio = 1 + 0.3 * torch.randn(size, generator=g) if dora else None
            out.append(LoRAWeights(A, B, scale, ratio=ratio))
        return out

    plan = dict(LAYOUTS)
    for slot, (ranks, dora) in plan.items():
        ws = weights(ranks, dora, 0.5 + 0.25 * slot)
        slots.fill(slot, ws)
        terms[slot] = [(linear.slice_of(n), w) for n, w in zip(SLICES, ws) if w is not None]
    segments = list(SEGMENTS)
    if merged:
        ws = weights(MERGED_LAYOUT, True, 0.75)
        neg = [None if w is None else LoRAWeights(w.A, w.B, -w.scale, ratio=1 / w.ratio, ratio_first=True) for w in ws]
        slots.fill(MERGED, neg)
        terms[MERGED] = [(linear.slice_of(n), w) for n, w in zip(SLICES, neg) if w is not None]
        segments.append((MERGED, 0, SEGMENTS[-1][2]))
    return slots, terms, segments, linear.bias


def reference(x, y0, bias, segments, terms) -> torch.Tensor:
    b = torch.zeros(OUT, dtype=torch.float64) if bias is None else bias.double()
    y = y0.double().clone()

    def scale(lo, hi, cols, ratio):
        y[lo:hi, cols] = b[cols] + ratio.double() * (y[lo:hi, cols] - b[cols])

    for slot, lo, hi in segments:
        for cols, w in terms[slot]:
            if w.ratio_first:
                scale(lo, hi, cols, w.ratio)
    for slot, lo, hi in segments:
        for cols, w in terms[slot]:
            y[lo:hi, cols] += x[lo:hi].double() @ w.A.double().T @ w.B.double().T * w.scale
    for slot, lo, hi in segments:
        for cols, w in terms[slot]:
            if w.ratio is not None and not w.ratio_first:
                scale(lo, hi, cols, w.ratio)
    return y


def check(batch_cls, bias: bool, merged: bool, slot_dtype=torch.float32, kernels=None, tolerance=1e-5):
    slots, terms, segments, b = build(bias, merged, slot_dtype, kernels)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, IN, generator=g)
    y0 = torch.randn(ROWS, OUT, generator=g)
    y = y0.clone()
    batch = batch_cls(segments)
    batch.apply(slots, x, y)
    ref = reference(x, y0, b, segments, terms)
    assert (ref - y0.double()).abs().max() > 0.1  # the adapters and ratios really change y
    err = ((y.double() - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
    assert err <= tolerance
    assert torch.equal(y[SEGMENTS[-1][2] :], y0[SEGMENTS[-1][2] :])  # base rows: bit for bit
    return batch


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged-dora-negation"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_torch_backend(bias, merged):
    batch = check(SegmentedLoRABatch, bias, merged)
    group = batch.passes[0][1]
    assert group is not None and {0, 3} <= set(group.slots)  # the two DoRA decode rows ran stacked


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged-dora-negation"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_torch_backend_with_cpu_kernels(request, bias, merged):
    check(SegmentedLoRABatch, bias, merged, torch.float16, request.getfixturevalue("kernels"))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged-dora-negation"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_triton_backend_under_the_interpreter(monkeypatch, bias, merged):
    pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lora_serve.lora.ops.triton_ops import TritonLoRABatch

    check(TritonLoRABatch, bias, merged)


def test_slots_forget_the_ratios_they_no_longer_hold():
    slots, _, _, _ = build(False, True, torch.float32)
    assert slots.rescaled == {0, 2, 3, MERGED}
    slots.clear(2)
    slots.fill(0, [LoRAWeights(torch.randn(4, IN), torch.randn(32, 4), 1.0), None, None])
    assert slots.rescaled == {3, MERGED}
