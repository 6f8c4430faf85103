"""Segmented mixed-adapter LoRA in plain torch (the CPU backend).

The batch is ordered by adapter slot once per step, so each adapter's tokens form one
contiguous run of rows (a segment, as in Punica's SGMV). Two ways to apply a step's segments:

- grouped: when many short segments (decode) use slots of one layout, one `bmm` shrink over
  the slot range and one `bmm` expand per slice cover all of them. A decode step with 32
  adapters then costs 4 batched matmuls per projection instead of 32 x 4 small ones; the
  per-op dispatch of the small ones was most of the LoRA time on CPU (docs/benchmarks.md).
- per segment: one shrink x[lo:hi]·Aᵀ over all of the adapter's slices at once, then one
  `addmm_` per slice straight into the output view (long segments: prefill, or one adapter).

Rows with no adapter are in no segment and receive nothing. Both compute in float32: bf16/fp16
slots (LoRAConfig.lora_dtype) are upcast per step, only the slot rows and rank columns used;
float32 slots (the CPU default) are read in place.
"""

from __future__ import annotations

import torch

from .segments import Segment, split_passes
from .slots import ProjectionSlots

# Grouping pads every segment of a pass to the longest one, over every slot of its range. It is
# chosen while segments are short and that block has at most MAX_PADDING times the real rows.
# On a 2-core AMD EPYC (SmolLM2-135M shapes, 32 adapters, r=16) grouping won clearly at one and
# two rows per segment, broke even around eight and lost by several times at 64 (prefill).
MAX_SEGMENT_ROWS = 4
MAX_PADDING = 4


class _Group:
    """Segments of distinct slots, applied as batched matmuls over slots s0..s1-1.

    The rows are scattered into a zero block [s1 - s0, m, in] (m = longest segment) at
    (slot - s0, position in segment); `dense` means each slot of the range has exactly one
    row and they are in slot order, so the block is a view of x[lo:hi] and no copy is made."""

    def __init__(self, segments: list[Segment]):
        slots = [s for s, _, _ in segments]
        self.s0, self.s1 = min(slots), max(slots) + 1
        self.m = max(hi - lo for _, lo, hi in segments)
        self.slots = slots
        self.lo, self.hi = segments[0][1], segments[-1][2]
        self.dense = self.m == 1 and len(segments) == self.s1 - self.s0 and slots == sorted(slots) and all(
            a[2] == b[1] for a, b in zip(segments, segments[1:])
        )
        self.segments = segments
        self.src: torch.Tensor | None = None  # [rows] row of x
        self.dst: torch.Tensor | None = None  # [rows] row of the flattened padded block

    @staticmethod
    def fits(segments: list[Segment]) -> bool:
        slots = [s for s, _, _ in segments]
        if len(segments) < 2 or len(set(slots)) != len(slots):
            return False
        rows = sum(hi - lo for _, lo, hi in segments)
        longest = max(hi - lo for _, lo, hi in segments)
        padded = (max(slots) - min(slots) + 1) * longest
        return longest <= MAX_SEGMENT_ROWS and padded <= MAX_PADDING * rows

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.src is None:  # once per step, on the first projection
            src, dst = [], []
            for slot, lo, hi in self.segments:
                src.extend(range(lo, hi))
                base = (slot - self.s0) * self.m
                dst.extend(range(base, base + hi - lo))
            self.src = torch.tensor(src, dtype=torch.long, device=device)
            self.dst = torch.tensor(dst, dtype=torch.long, device=device)
        return self.src, self.dst


class SegmentedLoRABatch:
    def __init__(self, segments: list[Segment]):
        self.segments = segments
        # Per pass: the short segments as one group when they fit, the rest one by one.
        self.passes: list[tuple[list[Segment], _Group | None]] = []
        for p in split_passes([s for s in segments if s[2] > s[1]]):  # empty ones dropped
            short = [seg for seg in p if seg[2] - seg[1] <= MAX_SEGMENT_ROWS]
            if _Group.fits(short):
                self.passes.append(([seg for seg in p if seg[2] - seg[1] > MAX_SEGMENT_ROWS], _Group(short)))
            else:
                self.passes.append((p, None))

    def apply(self, slots: ProjectionSlots, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (base output, updated in place)
        for segments, group in self.passes:
            if group is not None:
                signature = _shared_signature(slots, group.slots)
                if signature is None:  # layouts differ: per segment after all
                    _apply_segments(slots, group.segments, x, y)
                elif signature:  # () = no slot of the group targets this projection
                    _apply_group(slots, group, signature, x, y)
            _apply_segments(slots, segments, x, y)


def _shared_signature(slots: ProjectionSlots, used: list[int]):
    """The one layout of the used slots that target this projection; () if none does; None if
    they differ (then the group runs per segment). Untargeted slots are zero in A and B, so
    their rows get exactly zero from the batched matmuls."""
    shared = ()
    for slot in used:
        sig = slots.signature[slot]
        if sig:
            if not shared:
                shared = sig
            elif sig != shared:
                return None
    return shared


def _apply_group(slots: ProjectionSlots, g: _Group, signature, x: torch.Tensor, y: torch.Tensor) -> None:
    span, total_rank = g.s1 - g.s0, signature[-1][2]
    xs = x if x.dtype == torch.float32 else x.float()
    if g.dense:
        xp = xs[g.lo : g.hi].unsqueeze(1)  # [span, 1, in]
    else:
        src, dst = g.indices(x.device)
        xp = xs.new_zeros(span * g.m, xs.shape[1]).index_copy_(0, dst, xs.index_select(0, src))
        xp = xp.view(span, g.m, -1)  # [span, m, in]
    upcast = slots.A.dtype != torch.float32
    a = slots.A[g.s0 : g.s1, :total_rank]
    xa = torch.bmm(xp, (a.float() if upcast else a).transpose(1, 2))  # [span, m, total_rank]
    for s, r0, r1 in signature:
        out = slots.out_slices[s]
        b = slots.B[s][g.s0 : g.s1, :, : r1 - r0]
        bt = (b.float() if upcast else b).transpose(1, 2)  # [span, r, out_s], scale folded in
        d = torch.bmm(xa[:, :, r0:r1], bt).to(y.dtype)  # [span, m, out_s]
        if g.dense:
            y[g.lo : g.hi, out] += d.squeeze(1)
        else:
            y[:, out].index_add_(0, src, d.view(span * g.m, -1).index_select(0, dst))


def _apply_segments(slots: ProjectionSlots, segments: list[Segment], x: torch.Tensor, y: torch.Tensor) -> None:
    fp32 = y.dtype == torch.float32
    upcast = slots.A.dtype != torch.float32
    for slot, lo, hi in segments:
        a = slots.A_used[slot]
        if a is None:
            continue  # this adapter does not target this projection
        xs = x[lo:hi] if fp32 else x[lo:hi].float()
        xa = xs @ (a.float() if upcast else a)  # [n, sum of the slices' ranks]
        ys = y[lo:hi]
        for out, r0, r1, bt in slots.layout[slot]:  # bt: Bᵀ [r, out_s], scale folded in
            if upcast:
                bt = bt.float()
            if fp32:
                ys[:, out].addmm_(xa[:, r0:r1], bt)
            else:
                ys[:, out] += (xa[:, r0:r1] @ bt).to(y.dtype)
