"""Device slots holding the LoRA weights of resident adapters, one `ProjectionSlots` per projection.

Layout per projection with slices s = 1..n (q/k/v, gate/up, or one):
  A: [max_loras, n * max_rank, in]  the slices' A matrices packed row-wise, so the shrink
     x·Aᵀ of all slices is one matmul on the first `total_rank[slot]` rows;
  B: n tensors [max_loras, out_s, max_rank]  the nn.Linear layout; used as B.t(), which MKL
     multiplies about 3x faster than a contiguous [r, out] (shared/RESEARCH.md). The
     adapter's scale (alpha/r or alpha/sqrt(r)) is folded into B when the slot is filled.
Their dtype is LoRAConfig.lora_dtype (`resolve_lora_dtype`): by default float32 on CPU, where small
bf16 matmuls cost more than fp32, and the base's dtype on CUDA, as vLLM does: a decode step reads
every adapter of the batch, and float32 slots double those bytes (64 rank-16 adapters on all seven
projections of Llama-3-8B: 10.7 GB in float32, 5.4 GB in bfloat16, next to the base's 16.1 GB).
In a bf16/fp16 slot the scale is still applied in float32, before the one rounding to the slot
dtype; the backends keep the low-rank intermediate x·Aᵀ in float32, which needs the precision.
"""

from __future__ import annotations

import torch

from ..model.linear import Linear
from .lora_model import LoRAWeights


def resolve_lora_dtype(name: str, device: torch.device, base_dtype: torch.dtype) -> torch.dtype:
    """The slots' dtype for LoRAConfig.lora_dtype `name` (auto: float32 on CPU, the base's dtype on CUDA)."""
    if name == "auto":
        return base_dtype if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class ProjectionSlots:
    def __init__(self, linear: Linear, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.out_slices = [linear.slice_of(name) for name in linear.slice_names]
        n = len(self.out_slices)
        self.A = torch.zeros(max_loras, n * max_rank, linear.in_features, dtype=dtype, device=device)
        self.B = [torch.zeros(max_loras, s.stop - s.start, max_rank, dtype=dtype, device=device) for s in self.out_slices]
        # Per slot, views made once when the slot is filled (the step loop then does no view
        # arithmetic): A rows in use [total_rank, in], and per targeted slice
        # (output columns, first column of x·Aᵀ, last column, Bᵀ view [r, out_s]).
        self.total_rank = [0] * max_loras
        self.A_used: list[torch.Tensor | None] = [None] * max_loras
        self.layout: list[list[tuple[slice, int, int, torch.Tensor]]] = [[] for _ in range(max_loras)]
        # The same layout for the fused kernels (triton_ops.py), on the device: int32 [slot, 2, n],
        # [:, 0] each slice's rank (0: not targeted), [:, 1] its first row in A.
        self.kernel_meta = torch.zeros(max_loras, 2, n, dtype=torch.int32, device=device)
        # On CUDA, slots are written on a side stream (slot_writes.py); the step waits on this event
        # before it reads them.
        self.written: torch.cuda.Event | None = None
        # Per slot, ((slice index, first column, last column), ...): slots with equal signatures
        # pack A and B alike, so one batched matmul over them is exact (torch_ops.py).
        self.signature: list[tuple[tuple[int, int, int], ...]] = [()] * max_loras

    def fill(self, slot: int, weights: list[LoRAWeights | None]) -> None:
        """Copy one adapter's weights for this projection (one entry per slice, None = not targeted)."""
        self.clear(slot)
        row = 0
        meta = [[0] * len(weights), [0] * len(weights)]  # kernel_meta[slot]: ranks, first rows
        for s, w in enumerate(weights):
            if w is None:
                continue
            r = w.A.shape[0]
            # non_blocking + scaling on the device: from pinned memory a CUDA fill does not hold up the host
            # (a non_blocking copy_ to another dtype converts on the device too).
            self.A[slot, row : row + r].copy_(w.A, non_blocking=True)
            if self.A.dtype == torch.float32:
                self.B[s][slot, :, :r].copy_(w.B, non_blocking=True).mul_(w.scale)
            else:  # scaled in float32, then rounded once
                self.B[s][slot, :, :r].copy_(w.B.to(self.A.device, torch.float32, non_blocking=True) * w.scale)
            meta[0][s], meta[1][s] = r, row
            self.layout[slot].append((self.out_slices[s], row, row + r, self.B[s][slot, :, :r].t()))
            self.signature[slot] += ((s, row, row + r),)
            row += r
        self.total_rank[slot] = row
        self.A_used[slot] = self.A[slot, :row].t() if row else None  # [in, total_rank]
        self._set_kernel_meta(slot, meta)

    def clear(self, slot: int) -> None:
        # Zeroing is not needed for correctness (only layout rows are read) but keeps dumps honest.
        self.A[slot].zero_()
        for b in self.B:
            b[slot].zero_()
        self.total_rank[slot] = 0
        self.A_used[slot] = None
        self.layout[slot] = []
        self.signature[slot] = ()
        self._set_kernel_meta(slot, [[0] * len(self.B)] * 2)

    def _set_kernel_meta(self, slot: int, meta: list[list[int]]) -> None:
        # non_blocking: a blocking copy would wait for every weight copy queued before it.
        self.kernel_meta[slot].copy_(torch.tensor(meta, dtype=torch.int32), non_blocking=True)

    def wait_written(self) -> None:
        """Make the current CUDA stream wait for the last slot write (no-op on CPU or when none is pending)."""
        event, self.written = self.written, None
        if event is not None:
            torch.cuda.current_stream(self.A.device).wait_event(event)
