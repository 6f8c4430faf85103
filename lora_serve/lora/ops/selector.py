"""Which implementation of the mixed-adapter LoRA ops a device gets.

Every backend is a `LoRABatch` (model/linear.py) built from the step's segments
[(slot, first row, end row)] and reading the same `ProjectionSlots`:
  torch   segmented and batched matmuls (torch_ops.py): the fastest measured on CPU, and the
          fallback on CUDA when triton does not import;
  triton  one fused shrink and one fused expand launch per projection (triton_ops.py): CUDA, or
          CPU tensors under triton's interpreter (TRITON_INTERPRET=1, for tests; interpreter.py).
The backend is a resolved LoRAConfig.lora_backend: engine/resolve.py picks one for "auto" (triton on
CUDA when it imports, torch otherwise), refuses one that cannot run here, and logs the choice and why.
"""

from __future__ import annotations

from ...config_fields import LoRABackend
from .torch_ops import SegmentedLoRABatch


def triton_batch_class() -> tuple[type | None, str]:
    """(TritonLoRABatch, "") or (None, why it is unavailable). Triton stays an optional dependency."""
    try:
        from .triton_ops import TritonLoRABatch
    except ImportError as exc:
        return None, f"triton does not import ({exc})"
    return TritonLoRABatch, ""


def lora_batch_class(name: LoRABackend) -> type:
    """The LoRABatch class of a resolved lora_backend, "torch" or "triton"."""
    if name == "torch":
        return SegmentedLoRABatch
    if name != "triton":
        raise ValueError(f"lora_backend {name!r} is not torch or triton: the config is resolved first (engine/resolve.py)")
    cls, why = triton_batch_class()
    if cls is None:
        raise ValueError(f"lora_backend=triton was asked for but {why}")
    return cls
