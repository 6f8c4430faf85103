"""GPU check: the fused LoRA kernels against the torch path, then throughput against the base, at Llama shapes.

    python -m lora_serve.bench.gpu_check                         # CUDA machine: Llama-3.2-1B and Llama-3-8B shapes
    python -m lora_serve.bench.gpu_check --device cpu --tiny     # the same code on a 2-layer shape, on CPU, seconds

Per shape (random weights at the shape of the model's config.json: nothing is downloaded or read):
1. kernels: each backend against a float64 reference on every projection (kernel_check.py), in the
   run's dtype (bfloat16 on CUDA), with slots in the run's slot dtype (--lora-dtype; auto: the base's
   dtype on CUDA, float32 on CPU);
2. end to end: one batch of base rows, several adapters and one merged adapter through the whole
   model with each backend: the largest logit difference between backends, next to how far the
   adapters move the logits;
3. throughput: prefill and decode tok/s for the base, one adapter merged, one adapter unmerged and
   N distinct adapters (rank r, all seven projections), alternating within each round, every ratio
   to the base of the same round (mixed_lora.interleave / summarise);
4. profile: the base's decode step and the largest mix's, wall time against the device's kernel time and
   launches (step_profile.py): how much of a step the host spends launching kernels.
Distinct adapters share one random draw of A and B with a different scale each: every slot holds
different weights and the kernels read all of them, without drawing 64 x 8B-sized adapters on the CPU.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace

import torch

from ..config import LoRAConfig
from ..engine.resolve import resolve_device, resolve_dtype, resolve_lora_dtype
from ..engine.sampling_params import SamplingParams
from ..lora.ops.interpreter import triton_interpreted
from ..lora.ops.selector import triton_batch_class
from ..lora.ops.torch_ops import SegmentedLoRABatch
from ..model.loader import dtype_name
from .kernel_check import check_projections
from .llama_shapes import arch_of
from .mixed_lora import Configs, interleave, report, summarise
from .random_adapters import random_lora_model
from .random_engine import RandomEngine
from .runners import engine_phases, random_prompts
from .step_profile import profile_decode, profile_table
from .table import markdown_table

KERNEL_CHECK_MAX_RANK = 64


def run(plan) -> None:
    """plan: a BenchGPUCheck (gpu_check_plan.py). Prints markdown as it goes."""
    device = resolve_device(plan.device)
    dtype = resolve_dtype(plan.dtype, device)
    slot_dtype = resolve_lora_dtype(plan.lora_dtype, device, dtype)
    print(f"# {_hardware(device)}, torch {torch.__version__}, {_triton_version()}, {dtype}, LoRA slots in {slot_dtype}")
    backends: dict[str, type] = {"torch": SegmentedLoRABatch}
    triton_cls, why = triton_batch_class()
    if device.type == "cuda" or triton_interpreted():
        if triton_cls is None:
            print(f"# triton backend not checked: {why}")
        else:
            backends["triton"] = triton_cls
    ok, start = True, time.perf_counter()
    for shape in plan.shapes:
        ok &= check_shape(plan, shape, backends, device, dtype, slot_dtype)
        print(f"\n({shape} done at {time.perf_counter() - start:.0f} s)")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")


def check_shape(plan, shape: str, backends: dict[str, type], device: torch.device, dtype: torch.dtype, slot_dtype: torch.dtype) -> bool:
    arch = arch_of(shape)
    print(f"\n## {shape}: {arch.num_layers} layers, hidden {arch.hidden_size}, intermediate {arch.intermediate_size}\n")
    rows = _guarded("kernel check", check_projections, arch, backends, dtype, slot_dtype, device, KERNEL_CHECK_MAX_RANK, plan.seed)
    if rows is None:
        backends = {"torch": SegmentedLoRABatch}  # what follows runs on the torch path alone
        lora_backend = "torch"
    else:
        print(_kernel_table(rows, list(backends)))
        lora_backend = plan.backend
    num_adapters = max(plan.num_adapters_list)
    max_len = plan.prompt_len + max(plan.decode_steps, 2 * (plan.profile_steps or 0) + 3) + 8  # step_profile's decode
    # The slots' dtype as printed above, explicit: the checks swap backends on one engine, so its slots must
    # be in the layout every backend reads (not the CPU kernels' float16 one that auto would give on a CPU).
    lora = LoRAConfig(
        max_loras=num_adapters, max_cpu_loras=num_adapters, max_lora_rank=plan.rank, lora_backend=lora_backend,
        lora_dtype=dtype_name(slot_dtype),
    )  # fmt: skip
    engine = RandomEngine(arch, lora, device, dtype, plan.num_seqs, max_len, plan.seed)
    print(f"\nengine: LoRA ops {engine.lora.batch_cls.__name__}, {num_adapters} slots of rank {plan.rank}")
    names = _add_adapters(engine, num_adapters, plan.rank, plan.seed)
    e2e_ok = True
    if len(backends) > 1:
        e2e = _guarded("end-to-end check", compare_end_to_end, engine, backends, names, plan.prompt_len, plan.seed)
        e2e_ok = e2e is not None and e2e[0] <= 0.1 * e2e[1]
        if e2e is not None:
            print(
                f"end to end, logits: max |triton - torch| = {e2e[0]:.3g}, max |adapters - base| = {e2e[1]:.3g} ({'ok' if e2e_ok else 'CHECK'})"
            )
    print()
    table = _guarded("throughput", throughput, engine, plan, names)
    print(table or "")
    adapter_bytes = engine.adapters.get(names[0]).num_params * engine.lora.slot_dtype.itemsize
    base_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    for n in plan.num_adapters_list:
        print(f"decode reads the base ({base_bytes / 1e9:.3g} GB) and {n} adapters ({n * adapter_bytes / 1e9:.3g} GB): "
              f"memory-bound ceiling {base_bytes / (base_bytes + n * adapter_bytes):.2f} x base")  # fmt: skip
    if plan.profile_steps:
        profiled = _guarded("profile", profile_steps, engine, plan, names)
        print(f"\n{profiled}" if profiled else "")
    return rows is not None and e2e_ok and table is not None and all(r["ok"] for r in rows)


def _guarded(what: str, fn, *args):
    """fn(*args), or None after printing the traceback: one failing part must not cost a GPU run the others."""
    try:
        return fn(*args)
    except Exception:
        print(f"\n{what} FAILED:\n```\n{traceback.format_exc()}```")
        return None


def _add_adapters(engine: RandomEngine, n: int, rank: int, seed: int) -> list[str]:
    drawn = random_lora_model("gpu-check-0", engine.arch, rank, seed)
    drawn = engine.lora.slot_writer.host_copy(drawn, engine.lora.residency.layout)  # packed once; the others share its tensors
    names = []
    for i in range(n):
        factor = 1.0 + i / n
        weights = {k: replace(w, scale=w.scale * factor) for k, w in drawn.weights.items()}
        engine.add_adapter(replace(drawn, name=f"gpu-check-{i}", weights=weights))
        names.append(f"gpu-check-{i}")
    return names


def compare_end_to_end(
    engine: RandomEngine, backends: dict[str, type], names: list[str], prompt_len: int, seed: int
) -> tuple[float, float]:
    """(max logit difference between backends, max logit change the adapters cause) over two batches: prompts of
    prompt_len tokens (prefill-sized segments) and 1-token prompts (decode-sized ones), with a merged adapter."""
    k = len(names)
    loras = [None, names[0], names[1 % k], names[1 % k], None, names[2 % k], names[0], names[3 % k]]
    loras = loras[: engine.scheduler.max_num_seqs]
    diff = effect = 0.0
    for length in (prompt_len, 1):
        prompts = random_prompts(engine.arch.vocab_size, [length] * len(loras), seed)
        base = _logits(engine, SegmentedLoRABatch, prompts, [None] * len(loras))
        engine.merge_adapter(names[0])
        try:
            out = {name: _logits(engine, cls, prompts, loras) for name, cls in backends.items()}
        finally:
            engine.unmerge_adapter()
        effect = max(effect, (out["torch"] - base).abs().max().item())
        diff = max(diff, max((out[n] - out["torch"]).abs().max().item() for n in out))
    return diff, effect


def _logits(engine: RandomEngine, cls: type, prompts: list[list[int]], loras: Sequence[str | None]) -> torch.Tensor:
    engine.lora.batch_cls, chosen = cls, engine.lora.batch_cls
    try:
        for i, (p, lora) in enumerate(zip(prompts, loras)):
            engine.add_request(f"check-{i}", p, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), lora)
        by_id = engine.step()
    finally:
        engine.lora.batch_cls = chosen
    return torch.stack([by_id[f"check-{i}"] for i in range(len(prompts))]).float()


def throughput(engine: RandomEngine, plan, names: list[str]) -> str:
    prompts = random_prompts(engine.arch.vocab_size, [plan.prompt_len] * plan.num_seqs, plan.seed)
    one = [names[0]] * plan.num_seqs
    configs: Configs = {
        "base": ([None] * plan.num_seqs, None),
        "1 adapter merged": (one, names[0]),
        "1 adapter unmerged": (one, None),
    }
    for n in plan.num_adapters_list:
        configs[f"{n} adapters"] = ([names[i % n] for i in range(plan.num_seqs)], None)

    def measure(loras, warm_up):
        return engine_phases(engine, prompts, 2 if warm_up else plan.decode_steps, loras)

    rounds = interleave(engine, configs, plan.repeats, measure)
    return report(summarise(rounds, "base"), max(plan.num_adapters_list))


def profile_steps(engine: RandomEngine, plan, names: list[str]) -> str:
    """The base's decode step and the largest mix's, each profiled (step_profile.py)."""
    prompts = random_prompts(engine.arch.vocab_size, [plan.prompt_len] * plan.num_seqs, plan.seed)
    n = max(plan.num_adapters_list)
    mixes = {"base": [None] * plan.num_seqs, f"{n} adapters": [names[i % n] for i in range(plan.num_seqs)]}
    return profile_table({label: profile_decode(engine, prompts, loras, plan.profile_steps) for label, loras in mixes.items()})


def _kernel_table(rows: list[dict], backends: list[str]) -> str:
    header = ["projection", "rows", "segments"] + [f"{b} err / max delta" for b in backends] + ["base rows kept", "ok"]
    body = [
        [r["projection"], r["rows"], r["segments"]] + [f"{r[b]:.2e}" for b in backends]
        + [str(all(r[f"{b} base rows kept"] for b in backends)), "ok" if r["ok"] else "FAIL"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, body)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "no triton"
    return f"triton {triton.__version__}"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "CPU"


if __name__ == "__main__":
    from pydantic_settings import CliApp

    from .gpu_check_plan import BenchGPUCheck

    CliApp.run(BenchGPUCheck)
