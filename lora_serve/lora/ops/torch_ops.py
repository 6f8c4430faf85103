"""Segmented mixed-adapter LoRA in plain torch (the CPU backend).

The batch is ordered by adapter slot once per step, so each adapter's tokens form one
contiguous run of rows (a segment, as in Punica's SGMV). Two ways to apply a step's segments:

- grouped: when many short segments (decode) use adapters of one layout on a projection, their
  A and B are stacked and one `bmm` shrink and one `bmm` expand per slice cover all of them.
  A decode step with 32 adapters then costs a few batched matmuls per projection instead of
  32 x 4 small ones; the per-op dispatch of the small ones was most of the LoRA time on CPU
  (docs/benchmarks.md). The stacked block is kept across steps and patched as adapters come and
  go (stacks.py); each adapter keeps its exact rank.
- per segment: one shrink x[lo:hi]·Aᵀ over all of the adapter's slices at once, then one
  `addmm_` per slice straight into the output view (long segments: prefill, or one adapter).

Rows with no adapter are in no segment and receive nothing. DoRA adapters add their deltas the same
ways; their rows are then scaled by their ratios (rescale.py), before and after the deltas. Both compute in float32: float32 slots
are read in place, other 16-bit slots upcast per step.

A third way, for float16 slots read by the CPU kernels (model/cpu_kernels.c; the CPU default where
they build): per pass, one kernel call over every segment of up to 64 rows, decode rows and short
prefill chunks alike, each adapter read where it lies and converted in registers; nothing stacked or
padded, and no table built per step (the slots keep the kernels' table by slot, slots.py). Longer
segments go per segment, as above.
Measured against upcasting for MKL's GEMM (SmolLM2-135M, 2 threads, 2-vCPU EPYC): a 32 x 64-token
prefill with 32 adapters 0.79x -> ~1.0x the base's, a 1024-token one with one adapter 0.91x -> ~1.0x;
on a Xeon with AVX-512, where MKL is faster than these AVX2 kernels on long segments, that one
adapter's 2048-token prefill was 0.71x on the kernels and 0.99x on MKL, hence KERNEL_SEGMENT_ROWS.
"""

from __future__ import annotations

import torch

from ...model.cpu_kernels import SegmentTable
from ..slots import ProjectionSlots, SlotEntry
from .rescale import rescale
from .segments import Segment, split_passes
from .stacks import stack_for

# Grouping pads every segment of a group to the longest one. It is chosen while segments are short
# and that block has at most MAX_PADDING times the real rows. On a 2-core AMD EPYC (SmolLM2-135M
# shapes, 32 adapters, r=16) grouping won clearly at one and two rows per segment, broke even
# around eight and lost by several times at 64 (prefill).
MAX_SEGMENT_ROWS = 4
MAX_PADDING = 4

# Segments longer than this (prefill chunks) skip the CPU kernels for MKL's GEMM over the adapter upcast
# to float32, as the base's projections do past 64 rows (model/kernel_rows.py). `lora-serve bench lora`
# on a 2-vCPU Xeon with AVX-512 (docs/benchmarks.md): a 2048-token prefill on one adapter 0.71x -> 0.99x
# the base's; 64-row segments stay as fast on the kernels. Still so with the kernels' row tiles: 0.86-0.87x
# on them, 0.93-0.96x on MKL (`bench lora --num-seqs 1 --num-adapters 1 --prompt-len 2048`), since a
# segment's x then no longer stays in L2 between the kernel's tasks.
KERNEL_SEGMENT_ROWS = 64


class _Group:
    """Short segments of distinct slots, applied as batched matmuls where their adapters share a layout.

    Per projection, the segments whose entries have one signature form a block [g, m, in]
    (m = longest segment), the rows scattered into it at (segment, position in segment); `dense`
    means every segment is one row and they follow each other, so the block is a view of x."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.slots = [s for s, _, _ in segments]
        self.m = max(hi - lo for _, lo, hi in segments)
        self._indices: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def fits(segments: list[Segment]) -> bool:
        slots = [s for s, _, _ in segments]
        if len(segments) < 2 or len(set(slots)) != len(slots):
            return False
        rows = sum(hi - lo for _, lo, hi in segments)
        longest = max(hi - lo for _, lo, hi in segments)
        return longest <= MAX_SEGMENT_ROWS and len(segments) * longest <= MAX_PADDING * rows

    def dense(self, members: tuple[int, ...] | None = None) -> bool:
        """Whether the segments at `members` (default: all) are one row each, following each other."""
        members = tuple(range(len(self.segments))) if members is None else members
        lo = self.segments[members[0]][1]
        return self.m == 1 and all(self.segments[i][1:] == (lo + j, lo + j + 1) for j, i in enumerate(members))

    def indices(self, members: tuple[int, ...], positions: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of x, rows of the flattened block [c * m]) of the group's segments at `members`, the
        j-th of them at block position positions[j] (stacks.py)."""
        key = (members, positions)
        if key not in self._indices:  # once per step and layout, on the first projection
            src: list[int] = []
            dst: list[int] = []
            for i, p in zip(members, positions):
                _, lo, hi = self.segments[i]
                src.extend(range(lo, hi))
                dst.extend(range(p * self.m, p * self.m + hi - lo))
            self._indices[key] = (torch.tensor(src, device=device), torch.tensor(dst, device=device))
        return self._indices[key]


class SegmentedLoRABatch:
    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self._buffer: torch.Tensor | None = None  # the CPU kernels' x·Aᵀ, reused by every projection (_scratch)
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # views of _buffer by shape
        self._segment_tables: list[tuple[SegmentTable, list[Segment]]] | None = None
        # Per pass: the short segments as one group when they fit, the rest one by one.
        self.passes: list[tuple[list[Segment], _Group | None]] = []
        for p in split_passes([s for s in segments if s[2] > s[1]]):  # empty ones dropped
            short = [seg for seg in p if seg[2] - seg[1] <= MAX_SEGMENT_ROWS]
            if _Group.fits(short):
                self.passes.append(([seg for seg in p if seg[2] - seg[1] > MAX_SEGMENT_ROWS], _Group(short)))
            else:
                self.passes.append((p, None))

    def _kernel_segments(self) -> list[tuple[SegmentTable, list[Segment]]]:
        """Per pass: its segments of at most KERNEL_SEGMENT_ROWS rows as the CPU kernels read them, and the
        longer ones (prefill chunks) for MKL's GEMM; built on the step's first projection."""
        if self._segment_tables is None:
            self._segment_tables = []
            for segments, group in self.passes:
                every = segments + (group.segments if group else [])
                short = [s for s in every if s[2] - s[1] <= KERNEL_SEGMENT_ROWS]
                self._segment_tables.append((SegmentTable(short), [s for s in every if s[2] - s[1] > KERNEL_SEGMENT_ROWS]))
        return self._segment_tables

    def kernel_segments(self) -> SegmentTable | None:
        """The step's segments, when on a projection with a kernel table apply() is one kernel call over them:
        one pass, every segment within KERNEL_SEGMENT_ROWS (model/cpu_layers.py checks the rest: no DoRA ratio)."""
        tables = self._kernel_segments()
        if not tables:
            return SegmentTable([])  # no row with an adapter: nothing to add
        return tables[0][0] if len(tables) == 1 and not tables[0][1] else None

    def _scratch(self, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] float32 view of one buffer the step's projections share (allocating per projection
        cost page faults: 14% of the LoRA time of a prefill-heavy step under a py-spy profile), the view
        itself kept per shape (slicing it anew per projection was ~2% of a 16-adapter decode step)."""
        view = self._views.get((rows, cols))
        if view is not None:
            return view
        if self._buffer is None or self._buffer.shape[0] < rows or self._buffer.shape[1] < cols:
            self._buffer = torch.empty(rows, max(cols, 0 if self._buffer is None else self._buffer.shape[1]))
            self._views.clear()  # views of the old buffer
        view = self._views[rows, cols] = self._buffer[:rows, :cols]
        return view

    def apply(self, slots: ProjectionSlots, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (base output, updated in place)
        rescale(slots, self.segments, y, first=True)
        self._add_deltas(slots, x, y)
        rescale(slots, self.segments, y, first=False)

    def _add_deltas(self, slots: ProjectionSlots, x: torch.Tensor, y: torch.Tensor) -> None:
        table = slots.kernel_table
        if slots.kernels is not None and table is not None and x.dtype == y.dtype == torch.float32:
            # One kernel call per pass for its segments up to 64 rows, each adapter read where it lies
            # (float16, at its exact ranks; h [T, R] is row t's scaled x·Aᵀ); longer ones on MKL.
            h = self._scratch(x.shape[0], max(table.max_r, 1))
            for short, long in self._kernel_segments():
                slots.kernels.lora(x, h, y, short, table)
                _apply_segments(slots, long, x, y)
            return
        for segments, group in self.passes:
            if group is not None:
                _apply_group(slots, group, x, y)
            _apply_segments(slots, segments, x, y)


def _layouts(slots: ProjectionSlots, group: _Group) -> dict[tuple, list[int]]:
    """The group's segments by their entry's signature on this projection (untargeted ones left out)."""
    by_signature: dict[tuple, list[int]] = {}
    for i, (slot, _, _) in enumerate(group.segments):
        entry = slots.entries[slot] if slot < len(slots.entries) else None
        if entry is not None:
            by_signature.setdefault(entry.signature, []).append(i)
    return by_signature


def _apply_group(slots: ProjectionSlots, g: _Group, x: torch.Tensor, y: torch.Tensor) -> None:
    for members in _layouts(slots, g).values():
        if len(members) == 1:
            _apply_segments(slots, [g.segments[members[0]]], x, y)
            continue
        entries: list[SlotEntry] = [slots.entries[g.segments[i][0]] for i in members]  # type: ignore[misc]
        _apply_stacked(slots, g, tuple(members), entries, x, y)


def _apply_stacked(slots: ProjectionSlots, g: _Group, members: tuple[int, ...], entries: list[SlotEntry],
                   x: torch.Tensor, y: torch.Tensor) -> None:  # fmt: skip
    m = g.m
    xs = x if x.dtype == torch.float32 else x.float()
    lo, hi = g.segments[members[0]][1], g.segments[members[-1]][2]
    stack, positions = stack_for(slots.stacks, entries)
    c = stack.capacity
    dense = g.dense(members) and positions == list(range(c))  # rows in stack order, no stale position
    if dense:
        xp = xs[lo:hi].unsqueeze(1)  # [c, 1, in]
    else:
        src, dst = g.indices(members, tuple(positions), x.device)
        # src is ascending within [lo, hi): all of it when no segment of the group is left out (its
        # adapter has another layout here), and then the result adds to a slice of y, not row by row.
        whole = src.numel() == hi - lo
        xp = xs.new_zeros(c * m, xs.shape[1]).index_copy_(0, dst, xs.index_select(0, src)).view(c, m, -1)
    xa = torch.bmm(xp, stack.A.transpose(1, 2))  # [c, m, R]
    xa.mul_(stack.scales)  # [c, 1, R]: each column's scale
    for k, (out, r0, r1, _, _) in enumerate(entries[0].layout):
        d = torch.bmm(xa[:, :, r0:r1], stack.B[k].transpose(1, 2))  # B[k]: [c, out_s, r]
        if dense:
            y[lo:hi, out] += d.squeeze(1).to(y.dtype)
        elif whole:
            y[lo:hi, out] += d.view(c * m, -1).index_select(0, dst).to(y.dtype)
        else:
            y[:, out].index_add_(0, src, d.view(c * m, -1).index_select(0, dst).to(y.dtype))


def _apply_segments(slots: ProjectionSlots, segments: list[Segment], x: torch.Tensor, y: torch.Tensor) -> None:
    fp32 = y.dtype == torch.float32
    for slot, lo, hi in segments:
        entry = slots.entries[slot] if slot < len(slots.entries) else None
        if entry is None:
            continue  # this adapter does not target this projection
        a = entry.A if entry.A.dtype == torch.float32 else entry.A.float()
        xs = x[lo:hi] if fp32 else x[lo:hi].float()
        xa = xs @ a.t()  # [n, R]
        ys = y[lo:hi]
        for out, r0, r1, b, scale in entry.layout:
            bt = (b if b.dtype == torch.float32 else b.float()).t()  # [r, out_s]
            if fp32:
                ys[:, out].addmm_(xa[:, r0:r1], bt, alpha=scale)
            else:
                ys[:, out] += (scale * (xa[:, r0:r1] @ bt)).to(y.dtype)
