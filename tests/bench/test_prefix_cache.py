"""`bench prefix-cache` on the tiny model: both modes measured, warm finds the system prompt cached and cold nothing."""

from __future__ import annotations

from pathlib import Path

from lora_serve.bench import prefix_cache


def test_cold_and_warm_measured_side_by_side(tiny_llama_dir: Path):
    rows = prefix_cache.run(tiny_llama_dir, system_len=40, question_len=5, num_requests=4, num_adapters=1, rank=4, max_tokens=3, repeats=1)
    cold, warm = rows
    assert (cold["mode"], warm["mode"]) == ("cold", "warm")
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] == 4 * 32  # the system prompt's 2 full blocks of 16, each request
    assert cold["prompt_tokens"] == warm["prompt_tokens"] == 4 * 45
    assert all(r[k] > 0 for r in rows for k in ("ttft_mean_s", "ttft_p50_s", "round_s", "output_tok_s"))
    text = prefix_cache.report(rows)
    assert "| warm" in text and "128 / 180" in text


def test_bench_prefix_cache_flags():
    from pydantic_settings import CliApp

    from lora_serve.cli import LoraServe

    root = CliApp.run(
        LoraServe, cli_args=["bench", "prefix-cache", "--system-len", "512", "--num-adapters", "0"], cli_cmd_method_name="model_dump"
    )
    cmd = root.bench.prefix_cache
    assert cmd.system_len == 512 and cmd.num_adapters == 0 and cmd.num_requests == 16
