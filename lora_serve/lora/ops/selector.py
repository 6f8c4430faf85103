"""Which implementation of the mixed-adapter LoRA ops a device gets.

Every backend is a `LoRABatch` (model/linear.py) built from the step's segments
[(slot, first row, end row)] and reading the same `ProjectionSlots`:
  torch   segmented and batched matmuls (torch_ops.py): the fastest measured on CPU, and the
          fallback on CUDA when triton does not import;
  triton  one fused shrink and one fused expand launch per projection (triton_ops.py): CUDA, or
          CPU tensors under triton's interpreter (TRITON_INTERPRET=1, for tests; interpreter.py).
"auto" takes triton on CUDA when it imports, torch otherwise (the interpreter only when asked for). The choice and its reason are
logged once at start ("LoRA ops: ... backend ...").
"""

from __future__ import annotations

import logging

import torch

from .interpreter import triton_interpreted
from .torch_ops import SegmentedLoRABatch

log = logging.getLogger(__name__)


def triton_batch_class() -> tuple[type | None, str]:
    """(TritonLoRABatch, "") or (None, why it is unavailable). Triton stays an optional dependency."""
    try:
        from .triton_ops import TritonLoRABatch
    except ImportError as exc:
        return None, f"triton does not import ({exc})"
    return TritonLoRABatch, ""


def lora_batch_class(device: torch.device, name: str = "auto") -> type:
    interpreted = triton_interpreted()
    if name == "torch":
        reason = "asked for"
    elif name == "auto" and device.type != "cuda":
        reason = "CPU"
    else:
        if device.type != "cuda" and not interpreted:
            raise ValueError("the triton LoRA backend needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
        cls, why = triton_batch_class()
        if cls is not None:
            log.info("LoRA ops: triton backend on %s%s", device.type, " (interpreter)" if interpreted else "")
            return cls
        if name == "triton":
            raise ValueError(f"the triton LoRA backend was asked for but {why}")
        reason = why
    log.info("LoRA ops: torch backend on %s (%s)", device.type, reason)
    return SegmentedLoRABatch
