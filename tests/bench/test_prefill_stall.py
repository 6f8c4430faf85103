"""`bench prefill-stall` on the tiny model: every chunk size measured, chunking spreads the long prompt over steps,
and a queue of long prompts is timed until the last has its first token."""

from __future__ import annotations

from pathlib import Path

from lora_serve.bench import prefill_stall


def test_chunk_sizes_measured_side_by_side(tiny_llama_dir: Path):
    rows = prefill_stall.run(tiny_llama_dir, num_streams=3, long_prompt_len=300, chunks=(0, 64), stream_prompt_len=5, warm_steps=4)
    assert [r["chunk"] for r in rows] == [0, 64]
    whole, chunked = rows
    assert whole["steps_during"] == 1  # the whole prompt in the step it arrives in
    assert chunked["steps_during"] == -(-300 // 64)  # 64 prompt tokens a step, the streams decoding in each
    timed = ("itl_p50_before", "itl_p99_before", "itl_p99_during", "itl_p50_alone", "itl_p99_alone", "long_ttft_s")
    assert all(r[k] > 0 for r in rows for k in timed)
    for r in rows:  # the long prompt's cost against the same streams over the same steps without it, and against their start
        assert r["p99_ratio"] == r["itl_p99_during"] / r["itl_p99_alone"]
        assert r["p99_ratio_before"] == r["itl_p99_during"] / r["itl_p99_before"]
    text = prefill_stall.report(rows, 300)
    assert "whole prompt" in text and "300-token prompt TTFT" in text and "p99 during / alone" in text


def test_a_queue_of_long_prompts_is_timed_to_the_last_first_token(tiny_llama_dir: Path):
    rows = prefill_stall.run(
        tiny_llama_dir, num_streams=2, long_prompt_len=100, chunks=(32,), stream_prompt_len=5, warm_steps=4, num_long_prompts=3
    )
    (row,) = rows
    assert row["steps_during"] == -(-100 // 32)  # up to 32 tokens of each prompt a step, side by side
    assert 0 < row["long_ttft_s"] <= row["last_ttft_s"]  # the mean, and the last of the three
    assert row["mean_chunk"] == 300 / row["steps_during"]
    assert "3 x 100-token prompts' TTFT, mean / last (s)" in prefill_stall.report(rows, 100, 3)


def test_bench_prefill_stall_flags():
    from pydantic_settings import CliApp

    from lora_serve.cli import LoraServe

    root = CliApp.run(
        LoraServe,
        cli_args=["bench", "prefill-stall", "--chunks", "0", "256", "--num-streams", "4", "--num-long-prompts", "6"],
        cli_cmd_method_name="model_dump",
    )
    cmd = root.bench.prefill_stall
    assert cmd.chunks == [0, 256] and cmd.num_streams == 4 and cmd.long_prompt_len == 4000
    assert cmd.num_long_prompts == 6 and cmd.stalls == [2.0]
