"""`bench compose` on the tiny model: both batches timed side by side, the ratio theirs; the flags parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from lora_serve.bench import composed_batch
from lora_serve.cli import LoraServe


def test_one_adapter_per_row_and_composed_rows_measured_side_by_side(tiny_llama_dir: Path):
    result = composed_batch.run(tiny_llama_dir, num_seqs=4, num_composed=2, rank=4, prompt_len=5, decode_steps=2, repeats=1)
    one, composed = result[composed_batch.ONE_EACH], result["2 rows compose two"]
    assert one["decode_ratio"] == 1.0 and composed["decode_tok_s"] > 0
    assert composed["decode_ratio"] == pytest.approx(composed["decode_tok_s"] / one["decode_tok_s"])
    assert composed["decode_step_ms"] == pytest.approx(1e3 * 4 / composed["decode_tok_s"])
    assert "| 2 rows compose two" in composed_batch.report(result)


def _parse(args: list[str]):
    return CliApp.run(LoraServe, cli_args=["bench", "compose", *args], cli_cmd_method_name="model_dump").bench.compose


def test_flags():
    cmd = _parse(["--num-seqs", "16", "--num-composed", "4", "--rank", "8"])
    assert (cmd.num_seqs, cmd.num_composed, cmd.rank, cmd.repeats) == (16, 4, 8, 3)


@pytest.mark.parametrize("args", [["--num-seqs", "8", "--num-composed", "5"], ["--num-composed", "0"], ["--num-seqs", "1"]])
def test_bad_flags(args: list[str]):
    with pytest.raises((ValidationError, SystemExit)):
        _parse(args)
