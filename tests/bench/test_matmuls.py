"""`lora-serve bench matmuls`: every row count timed both ways over the model's own weights, and the floor beside them."""

from __future__ import annotations

from pathlib import Path

from lora_serve.bench import matmuls
from lora_serve.model.cpu_kernels import CPUKernels


def test_reports_each_row_count_against_the_bandwidth_floor(tiny_llama_dir: Path, kernels: CPUKernels) -> None:
    rows = matmuls.run(tiny_llama_dir, [1, 5], repeats=1)
    assert [r["rows"] for r in rows] == [1, 5]
    # tiny Llama: 2 layers x (q/k/v, o, gate/up, down) + the untied LM head, float32
    hidden, inter, kv, vocab = 64, 128, 32, 49152
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + hidden * 2 * inter + inter * hidden
    assert rows[0]["weight_bytes"] == 4 * (2 * per_layer + vocab * hidden)
    for r in rows:
        assert r["torch_ms"] > 0 and r["kernels_ms"] > 0 and r["floor_ms"] > 0
    text = matmuls.report(rows)
    lines = text.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["1", "5"] and "bandwidth floor" in lines[0]
