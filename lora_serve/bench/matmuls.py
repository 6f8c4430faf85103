"""The base's matmuls of one step, torch's against the CPU kernels, beside this machine's bandwidth floor.

    lora-serve bench matmuls --rows 1 8 32 128 256

For each row count: every projection of every layer and the LM head, in the order a step runs them, once
through torch's F.linear (MKL on CPU) and once through the CPU kernels (model/cpu_kernels.c), alternating
within each of `repeats` rounds (medians; model/kernel_rows.py, which makes the same measurement at
a server's first start to choose the row counts the kernels take). The weights are the model's own: 540 MB for SmolLM2-135M in
float32, far past the caches, as in serving. The floor is the time to read those bytes once at the read
bandwidth measured in the same run (roofline.py); a decode step cannot go below it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.cpu_kernels import cpu_kernels
from ..model.kernel_rows import measure
from ..model.loader import load_model
from .roofline import read_bandwidth
from .table import markdown_table


def run(model_path: Path, rows: list[int], repeats: int = 5) -> list[dict]:
    kernels, why = cpu_kernels()
    if kernels is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {why}")
    model = load_model(model_path, torch.float32, torch.device("cpu"), 64)
    weights = model.step_weights()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    floor_ms = nbytes / read_bandwidth() * 1e3
    times = measure(weights, kernels, tuple(rows), repeats)
    return [
        {"rows": n, "torch_ms": t, "kernels_ms": k, "speedup": t / k, "floor_ms": floor_ms, "weight_bytes": nbytes}
        for n, (t, k) in times.items()
    ]


def report(rows: list[dict]) -> str:
    table = markdown_table(
        ["rows", "torch F.linear ms", "CPU kernels ms", "kernels speedup", "bandwidth floor ms", "kernels / floor"],
        [[r["rows"], f"{r['torch_ms']:.1f}", f"{r['kernels_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['floor_ms']:.1f}",
          f"{r['kernels_ms'] / r['floor_ms']:.2f}"] for r in rows],
    )  # fmt: skip
    mb = rows[0]["weight_bytes"] / 1e6 if rows else 0
    return f"{table}\n\nfloor = {mb:.0f} MB of projection and LM-head weights / the read bandwidth measured here (roofline.py)"
