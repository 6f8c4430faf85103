"""How adapter weights reach the device slots: asynchronous copies on a side CUDA stream, or inline on CPU.

On CUDA the CPU tier keeps adapters in pinned memory (`host_copy`), so a slot fill is a queue
of non-blocking copies on a side stream and returns at once: loading an adapter never holds up
the engine thread. Each projection's writes are followed by an event that the step's stream
waits on before that projection first reads its slots (ProjectionSlots.wait_written, called
from Linear.forward), so layer 0 can run while later layers' weights are still copying. Writes
start after the work already queued on the caller's stream, which may still read the slot
being overwritten. On CPU every call here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .lora_model import LoRAModel
from .slots import ProjectionSlots


def shares_cpu_copy(device: torch.device, slot_dtype: torch.dtype) -> bool:
    """Whether the slots view the CPU tier's copies in place (residency.py's shared mode): on CPU, for
    float32 slots and for float16 ones (what the CPU kernels read; the CPU tier then keeps float16).
    Other slot dtypes on CPU are copied from float32 CPU copies, as on CUDA."""
    return device.type == "cpu" and slot_dtype in (torch.float32, torch.float16)


class SlotWriter:
    def __init__(self, device: torch.device, slot_dtype: torch.dtype, cpu_kernels: bool = False):
        """cpu_kernels: the slots are read by the CPU kernels (model/cpu_kernels.py), through the torch backend."""
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The CPU tier's dtype: the slots' own where they read it in place, else float32.
        self.host_dtype = slot_dtype if shares_cpu_copy(device, slot_dtype) else torch.float32
        # The CPU kernels read float16 adapters with each B stored as [r, out] (LoRAModel.packed).
        self.b_transposed = cpu_kernels and self.host_dtype == torch.float16

    def host_copy(self, model: LoRAModel, layout: list[tuple[int, tuple[str, ...]]]) -> LoRAModel:
        """The CPU-tier copy of an adapter: packed per projection (LoRAModel.packed) in host_dtype,
        pinned when slots are on CUDA (copies from pinned memory can be asynchronous)."""
        return model.packed(layout, pin=self.stream is not None, dtype=self.host_dtype, b_transposed=self.b_transposed)

    def host_bytes(self, num_params: int) -> int:
        """CPU-tier bytes of an adapter of num_params parameters."""
        return num_params * self.host_dtype.itemsize

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Slot writes inside this block run on the side stream (CUDA)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def mark_written(self, slots: ProjectionSlots) -> None:
        """Make the next read of `slots` wait for the writes queued so far."""
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            slots.written = event
