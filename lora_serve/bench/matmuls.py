"""The base's matmuls of one step, torch's against the CPU kernels, beside this machine's bandwidth floor.

    lora-serve bench matmuls --rows 1 8 32 128 256

For each row count: every projection of every layer and the LM head, in the order a step runs them, once
through torch's F.linear (MKL on CPU) and once through the CPU kernels (model/cpu_kernels.c), alternating
within each of `repeats` rounds (medians; model/kernel_rows.py, which makes the same measurement at
a server's first start to choose the row counts the kernels take). The weights are the model's own: 540 MB for SmolLM2-135M in
float32, far past the caches, as in serving. The floor is the time to read those bytes once at the read
bandwidth measured in the same run (roofline.py); a decode step cannot go below it.

With `step`, the engine's own decode step on the base at a batch of that many sequences (64-token
prompts, the median of 16 steps; runners.engine_phases), beside the matmul floor (the faster of the two
ways above, the matmuls the step cannot do without) and the bandwidth floor: what the rest of the step
(attention, norms, sampling, Python) adds shows as step / matmul floor.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..config import CacheConfig, EngineConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from ..model.cpu_kernels import cpu_kernels
from ..model.huge_pages import move_to_huge_pages
from ..model.kernel_rows import measure
from ..model.loader import load_model
from .roofline import read_bandwidth
from .runners import engine_phases, kv_cache_gb, random_prompts
from .table import markdown_table


def run(model_path: Path, rows: list[int], repeats: int = 5, step: bool = True) -> list[dict]:
    kernels, why = cpu_kernels()
    if kernels is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {why}")
    model = load_model(model_path, torch.float32, torch.device("cpu"), 64)
    move_to_huge_pages(model)  # where the engine keeps them (LLMEngine), so the floor is the step's own
    weights = model.step_weights()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    floor_ms = nbytes / read_bandwidth() * 1e3
    times = measure(weights, kernels, tuple(rows), repeats)
    del model, weights
    steps = decode_steps_ms(model_path, rows, repeats) if step else {}
    return [
        {"rows": n, "torch_ms": t, "kernels_ms": k, "speedup": t / k, "floor_ms": floor_ms, "weight_bytes": nbytes, "step_ms": steps.get(n)}
        for n, (t, k) in times.items()
    ]


def decode_steps_ms(model_path: Path, batches: list[int], repeats: int, prompt_len: int = 64, steps: int = 16) -> dict[int, float]:
    """{batch: the engine's median decode step in ms}, base only, float32, on the server's default backends."""
    engine = LLMEngine.from_config(
        EngineConfig(
            scheduler=SchedulerConfig(
                max_num_seqs=max(batches),
                max_model_len=prompt_len + steps + 16,
                max_num_batched_tokens=max(2048, max(batches) * prompt_len),
            ),
            cache=CacheConfig(
                kv_cache_memory_gb=kv_cache_gb(model_path, max(batches), prompt_len + steps + 16), enable_prefix_caching=False
            ),
        ),
        model_path,
    )
    out = {}
    for b in batches:
        prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * b, seed=b)
        medians = [statistics.median(t.seconds for t in engine_phases(engine, prompts, steps, [None] * b)[1]) for _ in range(repeats)]
        out[b] = statistics.median(medians) * 1e3
    return out


def report(rows: list[dict]) -> str:
    steps = any(r["step_ms"] is not None for r in rows)

    def step_cells(r: dict) -> list[str]:
        if not steps:
            return []
        matmul_floor = min(r["torch_ms"], r["kernels_ms"])
        return [f"{r['step_ms']:.1f}", f"{r['step_ms'] / matmul_floor:.2f}", f"{r['step_ms'] / r['floor_ms']:.2f}"]

    table = markdown_table(
        ["rows", "torch F.linear ms", "CPU kernels ms", "kernels speedup", "bandwidth floor ms", "kernels / floor",
         *(["decode step ms", "step / matmul floor", "step / bandwidth floor"] if steps else [])],
        [[r["rows"], f"{r['torch_ms']:.1f}", f"{r['kernels_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['floor_ms']:.1f}",
          f"{r['kernels_ms'] / r['floor_ms']:.2f}", *step_cells(r)] for r in rows],
    )  # fmt: skip
    mb = rows[0]["weight_bytes"] / 1e6 if rows else 0
    notes = f"floor = {mb:.0f} MB of projection and LM-head weights / the read bandwidth measured here (roofline.py)"
    if steps:
        notes += "; decode step: the engine's, base only, a batch of `rows` sequences; matmul floor: the faster of the two matmul columns"
    return f"{table}\n\n{notes}"
