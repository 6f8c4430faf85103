"""The quantized base (--quantization) against float32: a step's matmuls, then the engine's decode.

    lora-serve bench quantization --num-threads 2 --rows 1 8 16 64 --batch 1 8

Matmuls: every projection of every layer and the LM head, in the order a step runs them, for each row
count: float32 through F.linear and through the CPU kernels; int8 and int4 through the kernels
(quantized_weight.py), dequantized for F.linear (their path past KERNEL_MAX_ROWS), and through
torch's own weight-only ops (`torch._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` in groups of 32, gpt-fast's scheme), which it does not use. Medians of
`repeats` rounds, the ways alternating within a round.
Decode: one engine per scheme, all built first; for each batch size, `repeats` rounds that alternate
the schemes, each a prefill of `batch` prompts then `decode_steps` decode steps timed one by one
(runners.engine_phases); decode tok/s is the batch over the median step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import CacheConfig, EngineConfig, ModelConfig, Quantization, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from ..model.cpu_kernels import CPUKernels, cpu_kernels
from ..model.loader import load_model
from ..model.quantized_weight import Int4Weight, Int8Weight
from .runners import engine_phases, kv_cache_gb, random_prompts
from .table import markdown_table

SCHEMES: tuple[Quantization | None, ...] = (None, "int8", "int4")
TORCH_OPS_MAX_ROWS = 16  # torch's weight-only ops cost grows with every row: past this they only take time


def _torch_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 CPU layout of the same groups of 32 (q - 8)·scale + (min + 8·scale)."""
    q = Int4Weight(w, 32)
    n, k = q.shape
    runs = q.packed.view(n, k // 32, 16)
    ints = torch.cat([runs & 0x0F, runs >> 4], dim=-1).view(n, k).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 1)
    return packed, torch.stack([q.scales, q.mins + 8 * q.scales], dim=-1).transpose(0, 1).contiguous()


def matmul_ways(weights: list[torch.Tensor], kernels: CPUKernels, with_torch_ops: bool) -> dict[str, Callable]:
    """{way: f(inputs by input size)}: one step's matmuls each way."""
    q8 = [Int8Weight(w) for w in weights]
    q4 = [Int4Weight(w) for w in weights]
    ways: dict[str, Callable] = {
        "float32 F.linear": lambda xs: [F.linear(xs[w.shape[1]], w) for w in weights],
        "float32 kernels": lambda xs: [kernels.linear(xs[w.shape[1]], w) for w in weights],
        "int8 kernels": lambda xs: [q.kernel_matmul(xs[q.shape[1]], kernels) for q in q8],
        "int4 kernels": lambda xs: [q.kernel_matmul(xs[q.shape[1]], kernels) for q in q4],
        "int8 dequantized F.linear": lambda xs: [F.linear(xs[q.shape[1]], q.dequantize()) for q in q8],
        "int4 dequantized F.linear": lambda xs: [F.linear(xs[q.shape[1]], q.dequantize()) for q in q4],
    }
    if with_torch_ops:
        t8 = [(q.q, q.scales) for q in q8]
        t4 = [_torch_int4(w) for w in weights]
        ways["int8 torch op"] = lambda xs: [torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in t8]
        ways["int4 torch op"] = lambda xs: [
            torch.ops.aten._weight_int4pack_mm_for_cpu(xs[w.shape[1]], p, 32, sz) for w, (p, sz) in zip(weights, t4)
        ]
    return ways


def run_matmuls(model_path: Path, rows: list[int], repeats: int) -> list[dict]:
    kernels, why = cpu_kernels()
    if kernels is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {why}")
    weights = load_model(model_path, torch.float32, torch.device("cpu"), 64).step_weights()
    out = []
    for n in rows:
        ways = matmul_ways(weights, kernels, n <= TORCH_OPS_MAX_ROWS)
        xs = {k: torch.randn(n, k) for k in {w.shape[1] for w in weights}}
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(repeats + 1):
            for way, f in ways.items():
                start = time.perf_counter()
                f(xs)
                times[way].append((time.perf_counter() - start) * 1e3)
        out.append({"rows": n, **{way: statistics.median(t[1:]) for way, t in times.items()}})
    return out


def run_decode(model_path: Path, batches: list[int], prompt_len: int, decode_steps: int, repeats: int, seed: int) -> list[dict]:
    engines = {
        scheme: LLMEngine.from_config(
            EngineConfig(
                model=ModelConfig(quantization=scheme),
                scheduler=SchedulerConfig(
                    max_num_seqs=max(batches),
                    max_model_len=prompt_len + decode_steps + 16,
                    max_num_batched_tokens=max(2048, max(batches) * prompt_len),
                ),  # fmt: skip
                cache=CacheConfig(
                    kv_cache_memory_gb=kv_cache_gb(model_path, max(batches), prompt_len + decode_steps + 16), enable_prefix_caching=False
                ),  # fmt: skip
            ),
            model_path,
        )
        for scheme in SCHEMES
    }
    out = []
    for b in batches:
        prompts = random_prompts(next(iter(engines.values())).arch.vocab_size, [prompt_len] * b, seed + b)
        steps: dict[str, list[float]] = {str(s): [] for s in SCHEMES}
        for _ in range(repeats):
            for scheme, engine in engines.items():
                _, timings = engine_phases(engine, prompts, decode_steps, [None] * b)
                steps[str(scheme)].append(statistics.median(t.seconds for t in timings))
        out.append({"batch": b, **{s: b / statistics.median(t) for s, t in steps.items()}})
    return out


def report(matmuls: list[dict], decode: list[dict]) -> str:
    ways = [w for w in matmuls[0] if w != "rows"] if matmuls else []
    table = markdown_table(
        ["rows", *(f"{w} ms" for w in ways)],
        [[r["rows"], *(f"{r[w]:.1f}" if w in r else "-" for w in ways)] for r in matmuls],
    )
    names = {"None": "float32", "int8": "int8", "int4": "int4"}
    decode_table = markdown_table(
        ["batch", *(f"{names[str(s)]} decode tok/s" for s in SCHEMES), "int8 / float32", "int4 / float32"],
        [[r["batch"], *(f"{r[str(s)]:.1f}" for s in SCHEMES), f"{r['int8'] / r['None']:.2f}x", f"{r['int4'] / r['None']:.2f}x"] for r in decode],
    )  # fmt: skip
    return f"{table}\n\n{decode_table}"
