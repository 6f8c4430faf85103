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
        assert r["torch_ms"] > 0 and r["kernels_ms"] > 0 and r["floor_ms"] > 0 and r["step_ms"] > 0
    text = matmuls.report(rows)
    lines = text.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["1", "5"] and "bandwidth floor" in lines[0]
    header = [c.strip() for c in lines[0].split("|")]
    cells = [c.strip() for c in lines[3].split("|")]
    assert float(cells[header.index("decode step ms")]) == round(rows[1]["step_ms"], 1)
    matmul_floor = min(rows[1]["torch_ms"], rows[1]["kernels_ms"])
    assert float(cells[header.index("step / matmul floor")]) == round(rows[1]["step_ms"] / matmul_floor, 2)


def test_without_the_step_the_table_keeps_the_matmuls_only(tiny_llama_dir: Path, kernels: CPUKernels) -> None:
    rows = matmuls.run(tiny_llama_dir, [2], repeats=1, step=False)
    assert rows[0]["step_ms"] is None and "decode step" not in matmuls.report(rows)


def test_the_decode_steps_kv_cache_holds_the_largest_batch(default_model_dir: Path) -> None:
    """`bench matmuls` decodes batches of up to 256 sequences in one step each: 0.25 GB of float32 KV held ~5,400
    of SmolLM2's tokens, not 256 x 96, and the largest batch never finished."""
    import json

    from lora_serve.bench.runners import kv_cache_gb

    cfg = json.loads((default_model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4
    assert kv_cache_gb(default_model_dir, 256, 96) * 1e9 >= 256 * 96 * per_token > 0.25e9
    assert kv_cache_gb(default_model_dir, 1, 96) == 0.25
