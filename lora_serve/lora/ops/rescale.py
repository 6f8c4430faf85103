"""DoRA's per-row scale (lora/dora.py), applied by every backend around its deltas.

For the rows of a segment whose adapter has ratios on this projection, per targeted slice:
    y[rows, out] = bias[out] + ratio ⊙ (y[rows, out] − bias[out])        ratio: [out_s] float32
PEFT scales W·x + scale·B·A·x but not the bias. A DoRA adapter's ratio applies after every delta of
the step (the merged adapter's negation included) has been added; the negation of a merged DoRA
adapter applies its 1/ratio before any delta (ratio_first), so that W'·x / ratio − scale·B·A·x = W·x
is what the row's own adapter then adds to and scales. Only the merged negation's segment overlaps
others (segments.py), so no row gets two ratios of one kind. Computed in float32, rounded once to y's dtype.
"""

from __future__ import annotations

import torch

from ..slots import ProjectionSlots
from .segments import Segment


def rescale(slots: ProjectionSlots, segments: list[Segment], y: torch.Tensor, first: bool) -> None:
    """Scale y [T, out] in place for the segments whose ratios apply `first` (before the deltas) or after them."""
    if not slots.rescaled:
        return
    for slot, lo, hi in segments:
        if slot not in slots.rescaled or hi == lo:
            continue
        entry = slots.entries[slot]
        assert entry is not None  # slots.rescaled holds filled slots only
        if entry.ratio_first != first:
            continue
        for out, ratio in entry.ratios:
            ys = y[lo:hi, out]
            t = ys.float()  # [n, out_s]; y itself when float32
            if slots.bias is None:
                ys.copy_(t.mul_(ratio))
            else:
                b = slots.bias[out].float()
                ys.copy_(torch.addcmul(b, t - b, ratio))
