"""`bench structured` on the tiny model: the mixed and the free batch both timed over adapters, the masks' cost
measured, no constrained row ending early; the generated schemas are valid and differ; the flags parse."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from lora_serve.bench import constrained_batch
from lora_serve.cli import LoraServe


def test_mixed_and_free_batches_measured_side_by_side(tiny_llama_dir: Path):
    result = constrained_batch.run(tiny_llama_dir, batch=6, constrained=3, num_adapters=2, rank=4, prompt_len=5, output_len=4, rounds=1)
    assert result["free_tpot_s"] > 0 and result["mixed_tpot_s"] > 0
    assert result["ratio"] == pytest.approx(result["mixed_tpot_s"] / result["free_tpot_s"])
    assert result["mask_fill_s"] > 0 and result["mask_apply_s"] > 0
    text = constrained_batch.report(result)
    assert "| 6 rows, 2 adapters" in text and "3 constrained" in text


def test_without_constrained_rows_no_mask_is_timed(tiny_llama_dir: Path):
    result = constrained_batch.run(tiny_llama_dir, batch=2, constrained=0, num_adapters=0, rank=4, prompt_len=5, output_len=3, rounds=1)
    assert result["mask_fill_s"] == result["mask_apply_s"] == 0.0


def test_schemas_are_valid_and_differ():
    schemas = [constrained_batch.schema(i, 100) for i in range(16)]
    for s in schemas:
        jsonschema.Draft202012Validator.check_schema(s)
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 16
    assert len({tuple(s["properties"]) for s in schemas}) == 16  # property names differ, not only their order
    instance = {k: 1 for k in schemas[0]["properties"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**instance, "notes_0": "x" * 99}, schemas[0])  # a string shorter than min_chars never ends it


def _parse(args: list[str]):
    return CliApp.run(LoraServe, cli_args=["bench", "structured", *args], cli_cmd_method_name="model_dump").bench.structured


def test_flags():
    cmd = _parse(["--batch", "16", "--constrained", "4", "--num-adapters", "2", "--output-len", "8"])
    assert (cmd.batch, cmd.constrained, cmd.num_adapters, cmd.output_len, cmd.rounds) == (16, 4, 2, 8, 3)


@pytest.mark.parametrize("args", [["--batch", "4", "--constrained", "5"], ["--output-len", "1"], ["--num-adapters", "-1"]])
def test_bad_flags(args: list[str]):
    with pytest.raises((ValidationError, SystemExit)):
        _parse(args)


def test_a_schema_that_ends_early_stops_the_run(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(constrained_batch, "schema", lambda i, min_chars: {"enum": [i]})  # one token, then EOS
    with pytest.raises(RuntimeError, match="the batch shrank"):
        constrained_batch.run(tiny_llama_dir, batch=2, constrained=1, num_adapters=0, rank=4, prompt_len=5, output_len=4, rounds=1)
