"""The ceiling a mixed-adapter decode step can reach on this machine, printed beside what it reaches.

A decode step with k distinct adapters reads the base's weights and, on top, each adapter's A and B
for every projection it targets, at its own rank (one row per adapter, so no reuse of those bytes
within the step). With the base's decode step time T and the machine's read
bandwidth W, both measured in the same run:

    ceiling(k) = T / (T + k · adapter_bytes / W)      (decode throughput, as a ratio to the base's)

measured/ceiling near 1 means the adapters cost what reading their bytes costs: the ratio rises only
with fewer bytes per adapter row (16-bit slots, rows sharing an adapter). Well under 1 means time goes elsewhere (dispatch, gathers, uneven segments).
"""

from __future__ import annotations

import time

import torch

from ..model.huge_pages import huge_page_buffer

BANDWIDTH_BYTES = 512 * 2**20  # far past the last-level cache, as a step's weights are


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Bytes per second torch streams through when it reads a tensor once (the best of `repeats` sums), in
    huge pages where the system gives them, as the engine's weights are (model/huge_pages.py)."""
    buffer = huge_page_buffer(nbytes)
    x = torch.empty(nbytes // 4, dtype=torch.float32) if buffer is None else buffer.view(torch.float32)
    x.fill_(1.0)
    x.sum()  # first touch and thread start-up out of the way
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def decode_ceiling(base_step_s: float, num_adapters: int, adapter_bytes: int, bandwidth: float) -> float:
    """The best decode throughput ratio to the base a step with `num_adapters` distinct adapters can have."""
    return base_step_s / (base_step_s + num_adapters * adapter_bytes / bandwidth)
