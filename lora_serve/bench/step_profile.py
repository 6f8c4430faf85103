"""Where a decode step's time goes: wall time against device kernel time and kernel launches (gpu-check
--profile-steps).

A decode step is host-bound when the device runs its kernels for a small part of the step's wall time:
the host then spends the rest launching them one at a time, and faster kernels would not shorten it.
The split comes from torch.profiler; the wall time is measured on steps of their own, without the
profiler, which slows the host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from .table import markdown_table

# Name fragments of the LoRA kernels (lora/ops/triton_ops.py): the launches the adapters add.
LORA_KERNELS = ("_shrink_kernel", "_expand_kernel")


@dataclass
class StepProfile:
    """Per decode step: wall_ms without the profiler; kernel_ms, the device's kernel time; launches, kernels
    run on the device; lora_launches and lora_kernel_ms, the LoRA kernels among them."""

    wall_ms: float
    kernel_ms: float
    launches: float
    lora_launches: float
    lora_kernel_ms: float


def profile_decode(engine: LLMEngine, prompts: list[list[int]], loras: Sequence[str | None], steps: int) -> StepProfile:
    """Prefill the prompts, then time `steps` decode steps of the whole batch, then profile as many more."""
    params = SamplingParams(max_tokens=2 * steps + 3, temperature=0.0, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"profile-{i}", p, params, lora)
    engine.step()  # the prefill
    engine.step()  # one decode step, untimed
    _sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine.device)
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine.device)
    while engine.has_unfinished():
        engine.step()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    lora_kernels = [e for e in kernels if any(k in e.key for k in LORA_KERNELS)]
    per_step = lambda events, attr: sum(getattr(e, attr) for e in events) / steps  # noqa: E731
    return StepProfile(
        wall_ms=1e3 * wall,
        kernel_ms=per_step(kernels, "self_device_time_total") / 1e3,  # microseconds -> ms
        launches=per_step(kernels, "count"),
        lora_launches=per_step(lora_kernels, "count"),
        lora_kernel_ms=per_step(lora_kernels, "self_device_time_total") / 1e3,
    )


def profile_table(rows: dict[str, StepProfile]) -> str:
    header = ["decode step", "wall ms", "device kernels ms", "of the wall", "kernels launched", "of which LoRA", "LoRA kernels ms"]
    body = [
        [label, f"{p.wall_ms:.1f}", f"{p.kernel_ms:.1f}", f"{p.kernel_ms / p.wall_ms:.0%}", f"{p.launches:.0f}",
         f"{p.lora_launches:.0f}", f"{p.lora_kernel_ms:.2f}"]
        for label, p in rows.items()
    ]  # fmt: skip
    return markdown_table(header, body)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
