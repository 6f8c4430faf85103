"""`bench engine` and `bench lora` on the tiny model: every configuration measured, rotation when adapters outnumber slots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_serve.bench import engine_sweep, mixed_lora, roofline
from lora_serve.bench.mixed_lora import build_engine
from lora_serve.bench.runners import engine_run_phases, random_prompts
from lora_serve.engine.sampling_params import SamplingParams


def test_run_phases_counts_every_token_with_rotation(tiny_llama_dir: Path, tmp_path: Path):
    engine = build_engine(tiny_llama_dir, tmp_path, num_adapters=6, rank=4, num_seqs=12, max_len=32, max_loras=2, kv_cache_gb=0.02)
    prompts = random_prompts(engine.arch.vocab_size, [5 + i for i in range(12)], seed=0)
    prefill, steps, whole = engine_run_phases(engine, prompts, 4, [f"bench-{i % 6}" for i in range(12)])
    assert prefill.tokens == sum(map(len, prompts))
    assert sum(s.tokens for s in steps) == 12 * 4
    assert whole.tokens == 12 * 5 and whole.seconds >= prefill.seconds
    assert not engine.has_unfinished()


def test_sweep_rows_and_plot(tiny_llama_dir: Path, tmp_path: Path):
    rows = engine_sweep.sweep(
        tiny_llama_dir, [1, 4], num_seqs=8, rank=4, max_loras=2, prompt_len=6, decode_steps=3, repeats=1, progress=False, kv_cache_gb=0.02
    )
    assert [(r["num_adapters"], r["config"]) for r in rows] == [
        (1, "base"), (1, "1 adapter merged"), (1, "N adapters unmerged"),
        (4, "base"), (4, "1 adapter merged"), (4, "N adapters unmerged"),
    ]  # fmt: skip
    assert [r["max_loras"] for r in rows] == [1] * 3 + [2] * 3  # distinct adapters one step can hold: min(N, max_loras)
    assert all(r["run_ratio"] == 1.0 and r["decode_ratio"] == 1.0 for r in rows if r["config"] == "base")
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in rows for k in ("prefill_ratio", "decode_ratio", "run_ratio"))
    assert all((r["decode_ceiling"] == 1.0) == (r["config"] != "N adapters unmerged") for r in rows)
    assert all(0 < r["decode_ceiling"] <= 1.0 for r in rows)
    assert "N adapters unmerged" in engine_sweep.report(rows)
    paths = engine_sweep.write(rows, tmp_path, "s")
    assert all(p.stat().st_size > 0 for p in paths)


def test_bench_lora_still_runs(tiny_llama_dir: Path):
    result = mixed_lora.run(tiny_llama_dir, num_seqs=4, num_adapters=2, rank=4, prompt_len=6, decode_steps=2, repeats=1, with_peft=False)
    assert set(result) == {"base", "1 adapter unmerged", "1 adapter merged", "2 adapters"}
    assert "2 adapters" in mixed_lora.report(result, 2)
    # The roofline: no adapter bytes for the base and the merged adapter, fewer with more adapters.
    ceilings = {k: r["decode_ceiling"] for k, r in result.items()}
    assert ceilings["base"] == ceilings["1 adapter merged"] == 1.0
    assert 0 < ceilings["2 adapters"] < ceilings["1 adapter unmerged"] < 1.0
    assert result["base"]["read_bandwidth"] > 0 and result["base"]["adapter_bytes"] > 0


def test_sweep_with_peft_side_by_side(tiny_llama_dir: Path):
    rows = engine_sweep.sweep(
        tiny_llama_dir, [2], num_seqs=2, rank=4, prompt_len=4, decode_steps=2, repeats=1, with_peft=True, progress=False, kv_cache_gb=0.02
    )
    assert [r["config"] for r in rows] == [
        "base", "1 adapter merged", "N adapters unmerged", "peft base", "peft 1 adapter unmerged", "peft N adapters unmerged",
    ]  # fmt: skip
    assert "peft N adapters unmerged" in engine_sweep.report(rows)


def test_roofline_arithmetic():
    # A 100 ms base step and 4 adapters of 25 MB at 10 GB/s: 10 ms more, so at best 100/110 of the base.
    assert roofline.decode_ceiling(0.1, 4, 25_000_000, 10e9) == pytest.approx(0.1 / 0.11)
    assert roofline.decode_ceiling(0.1, 0, 25_000_000, 10e9) == 1.0
    assert roofline.read_bandwidth(nbytes=8 * 2**20, repeats=2) > 1e8  # any machine streams > 100 MB/s


def test_rounds_prefill_cold_though_they_repeat_the_prompts(tiny_llama_dir: Path, tmp_path: Path):
    """The offline benches time the same prompts round after round: a prefix-cache hit would time a fraction of a prefill."""
    engine = build_engine(tiny_llama_dir, tmp_path, num_adapters=1, rank=4, num_seqs=4, max_len=64, kv_cache_gb=0.02)
    prompts = random_prompts(engine.arch.vocab_size, [48] * 4, seed=0)
    for round_ in range(2):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{round_}-{i}", p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        outputs = engine.step()
        assert len(outputs) == 4 and all(o.num_cached_tokens == 0 for o in outputs)
        while engine.has_unfinished():
            engine.step()
