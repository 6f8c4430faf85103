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
        for slot, lo, hi in self.segments:
            rank = slots.total_rank[slot]
            if rank == 0:
                continue  # this adapter does not target this projection
            xs = x[lo:hi]
            if xs.dtype != torch.float32:
                xs = xs.float()
            xa = xs @ slots.A[slot, :rank].t()  # [n, sum of the slices' ranks]
            for s, row, r in slots.layout[slot]:
                out = slots.out_slices[s]
                b = slots.B[s][slot, :, :r]  # [out_s, r], scale folded in
                if y.dtype == torch.float32:
                    y[lo:hi, out].addmm_(xa[:, row : row + r], b.t())
                else:
                    y[lo:hi, out] += (xa[:, row : row + r] @ b.t()).to(y.dtype)
