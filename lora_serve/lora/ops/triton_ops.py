"""Mixed-adapter LoRA on CUDA with the fused Triton kernels (triton_kernels.py): the CUDA backend.

Per projection, one shrink launch (x·Aᵀ into a float32 buffer) and one expand launch (buffer·Bᵀ
added into the output) cover every adapter of the batch and every slice, where the torch
backend runs a few small matmuls per adapter. The step's segments reach the device once, on the
first projection, and every projection of the step reuses them.

Each adapter's weights are read where residency put them, at their exact ranks, through a table
of addresses per projection (`KernelTables`), rebuilt only when the projection's slots change.

Overlapping segments (segments.py) go to separate passes, each a shrink and an expand, so no
two programs of one launch add into the same output rows. DoRA's per-row scales run around the
launches as torch elementwise ops (rescale.py), only on projections where an adapter has them.
"""

from __future__ import annotations

import functools

import torch

from ..slots import ProjectionSlots
from . import triton_kernels as kernels
from .rescale import rescale
from .segments import Segment, split_passes
from .triton_kernels import KernelTables


def kernel_tables(slots: ProjectionSlots) -> KernelTables:
    cached = slots.kernel_tables
    if isinstance(cached, KernelTables) and cached.version == slots.version:
        return cached
    n = len(slots.out_slices)
    num = max(len(slots.entries), 1)
    ptrs = [[0] * (1 + kernels.MAX_SLICES) for _ in range(num)]
    meta = [[[0] * n, [0] * n] for _ in range(num)]
    scales = [[0.0] * n for _ in range(num)]
    max_rank = width = 0
    ref = None
    for slot, entry in enumerate(slots.entries):
        if entry is None:
            continue
        ref = entry.A
        ptrs[slot][0] = entry.A.data_ptr()
        width = max(width, entry.A.shape[0])
        for (_out, r0, r1, b, scale), (s, _, _) in zip(entry.layout, entry.signature):
            if not b.is_contiguous():
                raise ValueError("the Triton LoRA kernels read B [out, r] contiguous")
            ptrs[slot][1 + s] = b.data_ptr()
            meta[slot][0][s], meta[slot][1][s] = r1 - r0, r0
            scales[slot][s] = scale
            max_rank = max(max_rank, r1 - r0)
    dev = slots.device
    tables = KernelTables(
        torch.tensor(ptrs, dtype=torch.int64).to(dev, non_blocking=True),
        torch.tensor(meta, dtype=torch.int32).to(dev, non_blocking=True),
        torch.tensor(scales, dtype=torch.float32).to(dev, non_blocking=True),
        ref if ref is not None else torch.empty(0, dtype=slots.dtype, device=dev),
        max_rank, width, slots.version,
    )  # fmt: skip
    slots.kernel_tables = tables
    return tables


class TritonLoRABatch:
    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.passes = split_passes(segments)
        self.max_rows = [max((hi - lo for _, lo, hi in p), default=0) for p in self.passes]
        self._segs: torch.Tensor | None = None  # int32 [passes, 3, most segments]: slot, first row, rows
        self._bufs: dict[tuple, torch.Tensor] = {}

    def kernel_segments(self) -> None:
        """Never read by the CPU kernels (LoRABatch's protocol)."""
        return None

    def apply(self, slots: ProjectionSlots, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (base output, updated in place)
        tables = kernel_tables(slots)
        if tables.width == 0:
            return  # no adapter targets this projection
        segs = self._device_segments(x.device)
        rescale(slots, self.segments, y, first=True)
        for p, (group, rows) in enumerate(zip(self.passes, self.max_rows)):
            if rows == 0:
                continue
            split_k = self._split_k(x, len(group), len(slots.out_slices), rows)
            buf = self._buffer(split_k, x.shape[0], tables.width, x.device)
            kernels.shrink(x, tables, segs[p], len(group), rows, buf, split_k)
            kernels.expand(buf, tables, slots.out_slices, y, segs[p], len(group), rows)
        rescale(slots, self.segments, y, first=False)

    def _device_segments(self, device: torch.device) -> torch.Tensor:
        if self._segs is None:
            most = max(len(p) for p in self.passes)
            rows = []
            for group in self.passes:
                pad = [(0, 0, 0)] * (most - len(group))  # zero rows: the kernels return at once
                rows.append([[s for s, _, _ in group + pad], [lo for _, lo, _ in group + pad], [hi - lo for _, lo, hi in group + pad]])
            self._segs = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
        return self._segs

    def _buffer(self, split_k: int, num_rows: int, width: int, device: torch.device) -> torch.Tensor:
        # Uninitialised: the shrink writes every (row, column) the expand reads.
        key = (split_k, num_rows, width)
        if key not in self._bufs:
            self._bufs[key] = torch.empty(split_k, num_rows, width, dtype=torch.float32, device=device)
        return self._bufs[key]

    @staticmethod
    def _split_k(x: torch.Tensor, num_segs: int, num_slices: int, max_rows: int) -> int:
        """Split the shrink's reduction when segments x slices alone would leave most SMs idle. Decode-sized
        segments: up to about one wave of programs (7-8 fit on each SM at once), each keeping at least 8
        reduction tiles (Nsight Compute on an H200: at twice the SMs' count, 17-24% occupancy;
        docs/benchmarks.md, GPU). Prefill-sized ones, not measured so: up to twice the SMs' count."""
        if x.device.type != "cuda":
            return 1
        programs = num_segs * num_slices * -(-max_rows // kernels.block_m(max_rows))
        wave, most, tiles = (8, 16, 16) if max_rows <= 16 else (2, 8, 8)
        split = 1
        while programs * split < wave * _num_sms(x.device) and x.shape[1] >= tiles * kernels.BLOCK_K * split and split < most:
            split *= 2
        return split


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
