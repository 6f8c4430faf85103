"""How much adapter memory an engine has: LoRAConfig's budgets in bytes, sized once and logged.

    lora_memory_gb   bytes of adapter weights where the LoRA matmuls read them (resolved by
                     engine/resolve.py: 10% of the GPU's memory on CUDA; 4 GiB on CPU, where that
                     memory is the CPU tier itself (residency.py, "shared") and the bound applies to it).
    CPU tier         on CUDA, four times the device budget's adapters (as float32 host copies),
                     so a request never waits for a host copy while device room is free; on CPU
                     (float32 or float16 slots) the budget itself: the copies are read in place.
    max_cpu_loras    an extra bound on the count of CPU copies, when given.

The start-up log says how many rank-16 adapters on every projection of this base each holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config_fields import resolved
from ..lora_config import LoRAConfig
from ..model.llama import LlamaModel
from .slot_writes import shares_cpu_copy

log = logging.getLogger(__name__)

GIB = 1 << 30
CPU_TIER_FACTOR = 4  # CPU copies per device-resident adapter (copied mode)
REFERENCE_RANK = 16


@dataclass(frozen=True)
class LoRAMemory:
    budget_bytes: int  # adapter bytes where the matmuls read them (device, or the CPU tier when shared)
    cpu_bytes: int  # bound on the CPU tier's copies, in bytes
    max_cpu_loras: int | None  # bound on their count (None: bytes only)
    shared: bool  # CPU serving: the CPU tier, in the slots' dtype, is the memory the matmuls read
    reference_bytes: int  # one rank-16 all-projection adapter of this base in the slots' dtype
    device: str

    @classmethod
    def of(cls, config: LoRAConfig, model: LlamaModel, dtype: torch.dtype) -> LoRAMemory:
        """config: resolved (lora_memory_gb set); dtype: the slots'."""
        shared = shares_cpu_copy(model.device, dtype)
        budget = int(resolved(config.lora_memory_gb, "lora_memory_gb") * GIB)
        # Per projection slice (q, k, v, ... each): A [r, in] and B [out_s, r].
        reference_params = REFERENCE_RANK * sum(
            len(lin.slice_names) * lin.in_features + lin.out_features for layer in model.layers for lin in layer.linears()
        )
        cpu_bytes = budget if shared else CPU_TIER_FACTOR * budget // dtype.itemsize * 4
        return cls(budget, cpu_bytes, config.max_cpu_loras, shared, reference_params * dtype.itemsize, model.device.type)

    def log(self) -> None:
        holds = self.budget_bytes // self.reference_bytes
        where = "in the CPU tier, read in place" if self.shared else f"on {self.device}"
        log.info(
            "LoRA memory: %.2f GiB %s, %d rank-%d adapters on every projection of this base (%.1f MB each)%s",
            self.budget_bytes / GIB,
            where,
            holds,
            REFERENCE_RANK,
            self.reference_bytes / 1e6,
            "" if self.shared else f"; CPU tier {self.cpu_bytes / GIB:.2f} GiB",
        )
