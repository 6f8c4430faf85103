"""Random adapters in ProjectionSlots, and the float64 reference both LoRA backends are checked against.

The reference is computed from the adapters' own A, B and scale, not read back from the slots,
so a packing or layout mistake in the slots shows up as a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_serve.lora.lora_model import LoRAWeights
from lora_serve.lora.slots import ProjectionSlots
from lora_serve.model.cpu_kernels import CPUKernels
from lora_serve.model.linear import Linear

Terms = dict[int, list[tuple[slice, LoRAWeights]]]  # slot -> (output columns, weights) per targeted slice


def random_slots(
    in_features: int,
    slices: dict[str, int],
    ranks: dict[int, dict[str, int]],
    seed: int,
    scale_of: Callable[[int], float],
    b_std: float = 1.0,
    slot_dtype: torch.dtype = torch.float32,
    kernels: CPUKernels | None = None,
) -> tuple[ProjectionSlots, Terms]:
    """Slots of a projection with output `slices` {name: size}, filled per `ranks` {slot: {slice: rank}}
    (an untargeted slice is absent) with A ~ N(0, 1), B ~ N(0, b_std²) and scale `scale_of(slot)`.
    kernels: the CPU kernels, as residency hands them to the slots they read (float16 slots)."""
    g = torch.Generator().manual_seed(seed)
    linear = Linear(in_features, slices, bias=False, dtype=torch.float32, device=torch.device("cpu"))
    slots = ProjectionSlots(linear, torch.device("cpu"), slot_dtype, kernels)
    terms: Terms = {}
    for slot, by_slice in ranks.items():
        weights = [
            LoRAWeights(torch.randn(by_slice[n], in_features, generator=g), torch.randn(out, by_slice[n], generator=g) * b_std, scale_of(slot))
            if n in by_slice else None
            for n, out in slices.items()
        ]  # fmt: skip
        slots.fill(slot, weights)
        terms[slot] = [(linear.slice_of(n), w) for n, w in zip(slices, weights) if w is not None]
    return slots, terms


def reference(x: torch.Tensor, y0: torch.Tensor, segments, terms: Terms) -> torch.Tensor:
    """y0 + Σ over each row's segments of scale·(x·Aᵀ)·Bᵀ, in float64."""
    y = y0.double().clone()
    for slot, lo, hi in segments:
        for cols, w in terms[slot]:
            y[lo:hi, cols] += x[lo:hi].double() @ w.A.double().T @ w.B.double().T * w.scale
    return y
