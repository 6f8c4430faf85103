"""Which implementation of the mixed-adapter LoRA ops a device gets.

Every backend is a `LoRABatch` (model/linear.py) built from the step's segments
[(slot, first row, end row)] and reading the same `ProjectionSlots`. Today: plain torch
(segmented addmm, the fastest measured on CPU). A fused Triton kernel for CUDA registers
here beside it, chosen when its package imports.
"""

from __future__ import annotations

import logging

import torch

from .torch_ops import SegmentedLoRABatch

log = logging.getLogger(__name__)

BACKENDS: dict[str, type] = {"torch": SegmentedLoRABatch}


def lora_batch_class(device: torch.device) -> type:
    name = "torch"
    log.info("LoRA ops: %s backend on %s", name, device.type)
    return BACKENDS[name]
