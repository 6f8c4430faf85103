"""A linear projection that can take per-token LoRA deltas.

Projections that the base fuses (q/k/v, gate/up) are one weight here, with named
output slices; each slice keeps the PEFT module name (`q_proj`, ...) so an adapter
can target any subset. The LoRA manager attaches slot weights to `lora_slots`; the
per-step `LoRABatch` (which rows use which slot) is passed in by the caller. Both are
protocols here: the model layer does not import the LoRA layer above it.
With `--quantization`, `weight` is a `QuantizedWeight` (quantized_weight.py) instead of a float tensor.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import CPUKernels, SegmentTable, SlotTable
from .kernel_rows import ALL_BUCKETS, bucket_of
from .quantized_weight import QuantizedWeight


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, kernels: CPUKernels | None,
           kernel_buckets: frozenset[int] = ALL_BUCKETS) -> torch.Tensor:  # fmt: skip
    """F.linear, through the CPU kernels when they are given and the rows' bucket is one they take on this
    machine (kernel_rows.py: at most 64 rows); a quantized weight multiplies as QuantizedWeight.matmul
    says. x: [T, in] -> [T, out]."""
    if isinstance(weight, QuantizedWeight):
        y = weight.matmul(x, kernels)
        return y if bias is None else y.add_(bias)
    if kernels is not None and x.dtype == torch.float32 and bucket_of(x.shape[0]) in kernel_buckets:
        return kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class LoRASlots(Protocol):
    """The adapter weights attached to a projection, as the projection uses them (lora/slots.py's ProjectionSlots)."""

    kernel_table: SlotTable | None  # the adapters as the CPU kernels read them (float16 slots on the kernels), else None
    rescaled: set[int]  # slots whose rows also get a per-row scale (DoRA), which the kernels' LoRA call does not apply

    def wait_written(self) -> None:
        """Make what runs next wait for the slots' pending writes (CUDA: a fill still copying on a side stream)."""


class LoRABatch(Protocol):
    """Per-step adapter layout of the batch, shared by every projection of the model."""

    def apply(self, slots: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add scale·(x·Aᵀ)·Bᵀ for each row's adapter into y in place. x: [T, in], y: [T, out].
        slots: the projection's `lora_slots`, of the type the batch's backend reads (ProjectionSlots)."""

    def kernel_segments(self) -> SegmentTable | None:
        """The step's segments, when `apply` on a projection with a kernel table is one CPU-kernel call over
        them (one pass, none too long for the kernels): cpu_layers.py then makes those calls itself. None:
        not this batch."""


class Linear(nn.Module):
    def __init__(self, in_features: int, slices: dict[str, int], bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.slice_names = tuple(slices)
        self.slice_sizes = tuple(slices.values())
        self.slice_offsets = tuple(sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes)))
        out = sum(self.slice_sizes)
        self.weight: torch.Tensor | QuantizedWeight = nn.Parameter(
            torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.lora_slots: LoRASlots | None = None
        self.kernels: CPUKernels | None = None  # set by LlamaModel.use_cpu_kernels (the LoRA slots read it too)
        self.kernel_buckets = ALL_BUCKETS  # the step sizes whose base matmul the kernels take (kernel_rows.py)

    @property
    def out_features(self) -> int:
        return sum(self.slice_sizes)

    def slice_of(self, name: str) -> slice:
        i = self.slice_names.index(name)
        return slice(self.slice_offsets[i], self.slice_offsets[i] + self.slice_sizes[i])

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.kernels, self.kernel_buckets)  # [T, out]
        if lora is not None and self.lora_slots is not None:
            self.lora_slots.wait_written()  # CUDA: a slot fill still copying on its side stream
            lora.apply(self.lora_slots, x, y)
        return y
