"""The resident adapters of one projection, by slot: what the LoRA backends read.

A slot is an index into this table, not a block of memory: each entry views its adapter's own
tensors at their exact ranks (residency.py owns the memory), so nothing is padded to
max_lora_rank and a table holds as many adapters as the device memory budget does.
Per entry, for a projection with output slices s = 1..n (q/k/v, gate/up, or one):
  A: [R, in]  the targeted slices' A matrices packed row-wise in slice order (R = the sum of their
     ranks), so the shrink x·Aᵀ of all slices is one matmul;
  per targeted slice (output columns, first column of x·Aᵀ, end column, B [out_s, r], scale):
     B in the nn.Linear layout, used as B.t(), which MKL multiplies about 3x faster than a
     contiguous [r, out] (on a 2-vCPU EPYC); for the CPU kernels (float16 on CPU), a transposed
     view of [r, out] memory, which they read a rank at a time (LoRAModel.packed's b_transposed).
     The scale (alpha/r, or alpha/sqrt(r)) is applied in float32 by the backends, so the stored
     weights are the adapter's own, rounded at most once.
  per targeted DoRA slice (dora.py): (out columns, ratio [out_s] float32), the per-row scale the
     backends apply to the rows of the adapter's segments after their deltas (ops/rescale.py), or
     before them for a merged DoRA adapter's negation (ratio_first).
Their dtype is LoRAConfig.lora_dtype, resolved by engine/resolve.py: the base's dtype on CUDA, as vLLM
does (a decode step reads every adapter of the batch, and float32 doubles those bytes); on CPU float16
where the CPU kernels run (they read it in place), else float32 (torch's small bf16 matmuls cost more
than fp32's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.cpu_kernels import CPUKernels, SlotRows, SlotTable
from ..model.linear import Linear
from .lora_model import LoRAWeights

Signature = tuple[tuple[int, int, int], ...]  # ((slice index, first column of x·Aᵀ, end column), ...)


@dataclass(eq=False)
class SlotEntry:
    """One resident adapter on one projection."""

    A: torch.Tensor  # [R, in], the targeted slices' A rows packed in slice order
    layout: list[tuple[slice, int, int, torch.Tensor, float]]  # per targeted slice: (out columns, r0, r1, B [out_s, r], scale)
    signature: Signature  # entries with equal signatures pack alike: one batched matmul over them is exact
    scales: torch.Tensor  # [1, R] float32: each column of x·Aᵀ's scale (grouped matmuls scale before the expand)
    ratios: list[tuple[slice, torch.Tensor]]  # DoRA: per targeted slice, (out columns, ratio [out_s] float32); [] for LoRA
    ratio_first: bool  # the ratios scale the rows' base output before the deltas (a merged DoRA's negation), not after
    kernel_rows: SlotRows | None = None  # its rows in the CPU kernels' table (ProjectionSlots.kernel_table), when they read it


class ProjectionSlots:
    def __init__(self, linear: Linear, device: torch.device, dtype: torch.dtype = torch.float32, kernels: CPUKernels | None = None):
        self.out_slices = [linear.slice_of(name) for name in linear.slice_names]
        self.bias = linear.bias  # [out] or None: DoRA's ratio scales the rows' output but not the bias
        self.in_features = linear.in_features
        self.device, self.dtype = device, dtype
        self.kernels = kernels  # the CPU kernels (model/cpu_kernels.py) when they read these float16 entries (torch backend)
        # What those kernels read, kept in step with the entries by fill and clear.
        self.kernel_table = SlotTable(self.in_features) if kernels is not None and dtype == torch.float16 else None
        self.entries: list[SlotEntry | None] = []  # by slot; None: free, or the adapter does not target this projection
        self.rescaled: set[int] = set()  # slots whose entries have DoRA ratios: a batch without any pays nothing for them
        self.version = 0  # bumped by every fill and clear: the Triton backend rebuilds its tables on change
        self.kernel_tables: object | None = None  # the Triton backend's cache (ops/triton_kernels.py's KernelTables)
        self.stacks: dict = {}  # the torch backend's stacked adapters, by signature (ops/stacks.py)
        # On CUDA, slots are written on a side stream (slot_writes.py); the step waits on this event
        # before it reads them.
        self.written: torch.cuda.Event | None = None

    def fill(self, slot: int, weights: list[LoRAWeights | None], packed_A: torch.Tensor | None = None) -> None:
        """Point `slot` at one adapter's weights for this projection (one entry per slice, None = not
        targeted). packed_A: the targeted slices' A already packed [R, in] in the slots' dtype (a view
        of the adapter's device copy, residency.py); without it, A and B are copied into that layout."""
        self.put(slot, self.entry(weights, packed_A))

    def put(self, slot: int, entry: SlotEntry | None) -> None:
        """Point `slot` at `entry`, as `entry` built it (None: the adapter does not target this projection)."""
        if entry is None:
            self.clear(slot)
        else:
            self._set(slot, entry)

    def entry(self, weights: list[LoRAWeights | None], packed_A: torch.Tensor | None = None) -> SlotEntry | None:
        """The entry `fill` points a slot at, built without touching the table: any thread may build
        one for weights that stay put (residency.py prepares a CPU copy's entries as it is loaded)."""
        layout, row, ratios = [], 0, []
        signature: tuple[tuple[int, int, int], ...] = ()
        for s, w in enumerate(weights):
            if w is None:
                continue
            r = w.A.shape[0]
            B = w.B.to(self.device, self.dtype)  # no copy when it already is (residency's views)
            if self.kernels is not None and self.dtype == torch.float16:
                B = B if B.t().is_contiguous() else B.t().contiguous().t()  # the CPU kernels read [r, out] memory
            elif not (B.is_contiguous() or B.t().is_contiguous()):
                B = B.contiguous()
            layout.append((self.out_slices[s], row, row + r, B, float(w.scale)))
            if w.ratio is not None:
                ratios.append((self.out_slices[s], w.ratio.to(self.device, torch.float32)))
            signature += ((s, row, row + r),)
            row += r
        if not layout:
            return None
        if packed_A is None:
            packed_A = torch.cat([w.A for w in weights if w is not None]).to(self.device, self.dtype)
        if packed_A.shape != (row, self.in_features):
            raise ValueError(f"packed A is {tuple(packed_A.shape)}, the slices need {(row, self.in_features)}")
        scales = torch.cat([torch.full((r1 - r0,), scale) for _, r0, r1, _, scale in layout]).view(1, row).to(self.device)
        ratio_first = any(w.ratio_first for w in weights if w is not None)
        return self._with_kernel_rows(SlotEntry(packed_A, layout, signature, scales, ratios, ratio_first))

    def fill_scaled(self, slot: int, source: int, weight: float) -> None:
        """Point `slot` at the adapter in slot `source` with every scale times `weight`: the same A and B
        tensors (no copy), so one batch can read an adapter at several weights (lora/composition.py)."""
        entry = self.entries[source] if source < len(self.entries) else None
        if entry is None:
            self.clear(slot)
            return
        layout = [(out, r0, r1, b, scale * weight) for out, r0, r1, b, scale in entry.layout]
        if entry.ratios:  # a DoRA ratio depends on the scale: AdapterCatalog.check_composition refuses DoRA adapters
            raise ValueError("a DoRA adapter has no weighted entry")
        scaled = SlotEntry(entry.A, layout, entry.signature, entry.scales * weight, [], False)  # scales: [1, R] float32
        self._set(slot, self._with_kernel_rows(scaled))

    def _with_kernel_rows(self, entry: SlotEntry) -> SlotEntry:
        if self.kernel_table is not None:
            slices = [(r0, b, out.start) for out, r0, _, b, _ in entry.layout]
            entry.kernel_rows = self.kernel_table.rows(entry.A, entry.scales.view(-1), slices)
        return entry

    def _set(self, slot: int, entry: SlotEntry) -> None:
        while len(self.entries) <= slot:
            self.entries.append(None)
        self.entries[slot] = entry
        self.rescaled.discard(slot)
        if entry.ratios:
            self.rescaled.add(slot)
        self.version += 1
        if self.kernel_table is not None:
            assert entry.kernel_rows is not None, "entries the CPU kernels read carry their rows (entry, fill_scaled)"
            self.kernel_table.put(slot, entry.kernel_rows)

    def clear(self, slot: int) -> None:
        while len(self.entries) <= slot:  # every slot a batch names has a row, here and in the kernels' tables
            self.entries.append(None)
        self.entries[slot] = None
        self.rescaled.discard(slot)
        self.version += 1
        if self.kernel_table is not None:
            self.kernel_table.set(slot, None)

    def wait_written(self) -> None:
        """Make the current CUDA stream wait for the last slot write (no-op on CPU or when none is pending)."""
        event, self.written = self.written, None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
