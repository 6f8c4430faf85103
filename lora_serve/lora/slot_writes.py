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


class SlotWriter:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def host_copy(self, model: LoRAModel, layout: list[tuple[int, tuple[str, ...]]]) -> LoRAModel:
        """The CPU-tier copy of an adapter: packed per projection (LoRAModel.packed), pinned when slots
        are on CUDA (copies from pinned memory can be asynchronous)."""
        return model.packed(layout, pin=self.stream is not None)

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
