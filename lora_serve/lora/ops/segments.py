"""A step's segments: runs of batch rows that share an adapter slot, as every backend takes them.

The LoRA manager orders the batch by slot once per step, so each adapter's rows are one run
(slot, lo, hi) (Punica's SGMV segments). Segments may overlap: while an adapter is merged, one
extra segment, the negated merged adapter, covers rows of other segments too (lora/merge.py). A
backend applies them in passes of disjoint segments, so no two of a pass add into one row.
"""

from __future__ import annotations

Segment = tuple[int, int, int]  # (slot, lo, hi): rows lo..hi-1 of the packed batch use `slot`


def split_passes(segments: list[Segment]) -> list[list[Segment]]:
    """Segments grouped so that no two in a group share a row (greedy interval partitioning:
    two passes at most in practice); empty ones go to the first."""
    passes: list[list[Segment]] = []
    ends: list[int] = []  # per pass, the largest hi so far (segments arrive sorted by lo)
    for seg in sorted(segments, key=lambda s: s[1]):
        _, lo, hi = seg
        p = next((i for i, end in enumerate(ends) if end <= lo or lo == hi), len(passes))
        if p == len(passes):
            passes.append([])
            ends.append(lo)
        passes[p].append(seg)
        ends[p] = max(ends[p], hi)
    return passes
