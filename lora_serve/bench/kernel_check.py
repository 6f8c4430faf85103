"""The LoRA backends against a float64 reference on the projections of one model shape (gpu_check.py).

Per projection of a Llama block (q/k/v fused, o, gate/up fused, down): slots in the slot dtype
under test (LoRAConfig.lora_dtype) filled with random adapters of mixed ranks (1..max_rank) and
targets, random segment lengths (empty ones, prefill- and decode-sized ones), base-only rows after
them, and the negated merged adapter over every adapter row (overlapping segments, as while an
adapter is merged). Each backend's output is compared with y0 + Σ scale·(x·Aᵀ)·Bᵀ computed in
float64 from the adapters' own tensors; the error is relative to the largest |delta|, and base-only
rows must come back bit for bit.
"""

from __future__ import annotations

import random

import torch

from ..lora.lora_model import LoRAWeights, projection_shapes
from ..lora.slots import ProjectionSlots
from ..model.arch import ModelArch
from ..model.linear import Linear

FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
NUM_SLOTS = 9  # 8 adapters + the merged adapter's negation
# Largest error relative to max |delta| accepted per dtype (bf16 keeps 8 bits of mantissa): the
# coarser of the output's and the slots'.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _case(arch: ModelArch, modules: tuple[str, ...], max_rank: int, dtype: torch.dtype, slot_dtype: torch.dtype,
          device: torch.device, seed: int):  # fmt: skip
    """(slots, segments, x, y0, reference y, number of adapter rows) for one fused projection."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(arch)
    fan_in = shapes[modules[0]][0]
    linear = Linear(fan_in, {m: shapes[m][1] for m in modules}, False, dtype, device)
    slots = ProjectionSlots(linear, device, slot_dtype)
    weights: dict[int, list[LoRAWeights | None]] = {}
    for slot in range(NUM_SLOTS):
        per_slice = []
        for m in modules:
            r = rng.randint(1, max_rank) if rng.random() < 0.8 else None
            w = (
                None
                if r is None
                else LoRAWeights(
                    torch.randn(r, fan_in, generator=g) / fan_in**0.5, torch.randn(shapes[m][1], r, generator=g), rng.uniform(-2, 2)
                )
            )
            per_slice.append(w)
        slots.fill(slot, per_slice)
        weights[slot] = per_slice
    segments, row = [], 0
    for slot in rng.sample(range(NUM_SLOTS - 1), NUM_SLOTS - 1):
        n = rng.choice([0, 1, 1, 1, 3, 17, 40])
        segments.append((slot, row, row + n))
        row += n
    segments.append((NUM_SLOTS - 1, 0, row))
    num_rows = row + 5  # base-only rows at the end
    x = torch.randn(num_rows, fan_in, generator=g).to(device, dtype)
    y0 = torch.randn(num_rows, linear.out_features, generator=g).to(device, dtype)
    ref = y0.double()
    for slot, lo, hi in segments:
        for out, w in zip(slots.out_slices, weights[slot]):
            if w is not None:
                ref[lo:hi, out] += x[lo:hi].double() @ w.A.to(device).double().T @ w.B.to(device).double().T * w.scale
    return slots, segments, x, y0, ref, row


def check_projections(arch: ModelArch, backends: dict[str, type], dtype: torch.dtype, slot_dtype: torch.dtype,
                      device: torch.device, max_rank: int, seed: int = 0) -> list[dict]:  # fmt: skip
    """One row per projection: each backend's relative error, whether base-only rows stayed as they were."""
    results = []
    for i, modules in enumerate(FUSED):
        slots, segments, x, y0, ref, adapter_rows = _case(arch, modules, max_rank, dtype, slot_dtype, device, seed + i)
        scale = (ref - y0.double()).abs().max().item() or 1.0
        row = {"projection": "/".join(modules), "rows": x.shape[0], "segments": len(segments)}
        for name, cls in backends.items():
            y = y0.clone()
            cls(segments).apply(slots, x, y)
            row[name] = (y.double() - ref).abs().max().item() / scale
            row[f"{name} base rows kept"] = torch.equal(y[adapter_rows:], y0[adapter_rows:])
        tolerance = max(TOLERANCE[dtype], TOLERANCE[slot_dtype])
        row["ok"] = all(row[n] <= tolerance and row[f"{n} base rows kept"] for n in backends)
        results.append(row)
    return results
