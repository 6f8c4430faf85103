"""Which batch sizes of the base's projections the CPU kernels take on this machine: measured once, cached.

The kernels (cpu_kernels.c, AVX2) against torch's F.linear (MKL) over a step's weights depend on the CPU
(`lora-serve bench matmuls`, SmolLM2-135M, 2 threads): on a 2-vCPU AMD EPYC they won from 1 to 96
rows (1.8x at 1, 2.1-2.4x at 8); on a 2-vCPU Xeon with AVX-512, which MKL uses and they do not, only
around 8 (0.83x at 1 row, 1.15x at 8, 0.87x at 16, 0.57x at 64). So with `--cpu-kernels auto`, the first
start on a machine times every projection and the LM head both ways for each bucket of rows (1, 2, 4,
..., 64; ~2 s for SmolLM2), and the kernels take the buckets they win. The choice is cached under
<cache>/kernels/ by CPU model, weight shapes, threads, torch version and kernel build, and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_kernels import CPUKernels, build_key
from .default_model import cache_root

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a step of T rows is in the smallest bucket >= T; past 64, always torch
ALL_BUCKETS = frozenset(BUCKETS)
REPEATS = 3  # timed passes per bucket and side, after one warm-up pass (the fastest of them counts)


def bucket_of(rows: int) -> int:
    """The bucket of a step of `rows` rows: the next power of two (rows >= 1)."""
    return 1 << (rows - 1).bit_length()


def kernel_buckets(weights: list[torch.Tensor], kernels: CPUKernels) -> frozenset[int]:
    """The buckets where the kernels beat F.linear over these weights (a step's projections and LM head,
    in order), from the cache or measured now."""
    path = cache_root() / "kernels" / f"rows_{_key(weights)}.json"
    try:
        return frozenset(json.loads(path.read_text())["kernel_buckets"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    times = measure(weights, kernels)
    won = frozenset(n for n, (torch_ms, kernels_ms) in times.items() if kernels_ms < torch_ms)
    log.info(
        "CPU kernels vs torch for the base's projections (ms per step's weights): %s; the kernels take %s rows",
        ", ".join(f"{n}: {k:.1f} vs {t:.1f}" for n, (t, k) in times.items()),
        sorted(won) or "no",
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.time_ns()}.tmp")
        tmp.write_text(json.dumps({"kernel_buckets": sorted(won), "ms": {n: list(t) for n, t in times.items()}}))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache: measured again at the next start
        log.warning("could not cache the CPU kernels' row choice at %s: %s", path, exc)
    return won


def measure(weights: list[torch.Tensor], kernels: CPUKernels, rows: tuple[int, ...] = BUCKETS,
            repeats: int = REPEATS) -> dict[int, tuple[float, float]]:  # fmt: skip
    """{rows: (torch ms, kernels ms)}: the fastest of `repeats` passes over every weight (after one warm-up),
    the two alternating. The weights are the model's own, past the caches as in serving. The fastest, not
    the median: other work on the machine only adds time, and a choice made once is cached for good (a
    median over a busy second once gave torch the 4-row bucket, which the kernels win 1.6x when quiet)."""
    out = {}
    for n in rows:
        inputs = {w.shape[1]: torch.randn(n, w.shape[1]) for w in weights}
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats + 1):
            for use_kernels in (False, True):
                start = time.perf_counter()
                for w in weights:
                    kernels.linear(inputs[w.shape[1]], w) if use_kernels else F.linear(inputs[w.shape[1]], w)
                runs[use_kernels].append((time.perf_counter() - start) * 1e3)
        out[n] = (min(runs[False][1:]), min(runs[True][1:]))
    return out


def _key(weights: list[torch.Tensor]) -> str:
    parts = [
        _cpu_model(),
        str(torch.get_num_threads()),
        torch.__version__,
        build_key(),
        json.dumps([list(w.shape) for w in weights]),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
