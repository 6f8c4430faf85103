"""Segmented mixed-adapter LoRA in plain torch (the CPU backend).

The batch is ordered by adapter slot once per step, so each adapter's tokens form one
contiguous run of rows (a segment, as in Punica's SGMV). Per projection and segment:
one shrink x[lo:hi]·Aᵀ over all of the adapter's slices at once, then one
`addmm_` per slice straight into the output view. Rows with no adapter are in no
segment and receive nothing. Measured against per-token gathers and PEFT's
mask-per-adapter loop, this was the fastest on CPU (shared/RESEARCH.md).
"""

from __future__ import annotations

import torch

from .slots import ProjectionSlots


class SegmentedLoRABatch:
    def __init__(self, segments: list[tuple[int, int, int]]):
        self.segments = segments  # (slot, lo, hi): rows lo..hi-1 of the packed batch use `slot`

    def apply(self, slots: ProjectionSlots, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (base output, updated in place)
        fp32 = y.dtype == torch.float32
        for slot, lo, hi in self.segments:
            a = slots.A_used[slot]
            if a is None:
                continue  # this adapter does not target this projection
            xs = x[lo:hi] if fp32 else x[lo:hi].float()
            xa = xs @ a  # [n, sum of the slices' ranks]
            ys = y[lo:hi]
            for out, r0, r1, bt in slots.layout[slot]:  # bt: Bᵀ [r, out_s], scale folded in
                if fp32:
                    ys[:, out].addmm_(xa[:, r0:r1], bt)
                else:
                    ys[:, out] += (xa[:, r0:r1] @ bt).to(y.dtype)
