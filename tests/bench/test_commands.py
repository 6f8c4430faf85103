"""`lora-serve bench serve|engine` flags parse into their typed configs; bad combinations are refused."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from lora_serve.bench.commands import BenchServe
from lora_serve.bench.engine_commands import BenchEngine
from lora_serve.cli import LoraServe

SUBCOMMAND = {BenchServe: "serve", BenchEngine: "engine"}


def parse(cls, args: list[str]):
    """Through the real `lora-serve` parser; the root's model_dump instead of cli_cmd, so nothing runs."""
    root = CliApp.run(LoraServe, cli_args=["bench", SUBCOMMAND[cls], *args], cli_cmd_method_name="model_dump")
    return getattr(root.bench, SUBCOMMAND[cls])


def test_serve_flags():
    cmd = parse(BenchServe, [
        "--url", "http://h:1", "--adapters", "a", "b", "c", "--request-rate", "1", "2", "inf", "--input-len", "8", "16",
        "--goodput", "ttft:500", "tpot:100", "--popularity", "zipf", "--with-base", "true",
    ])  # fmt: skip
    assert cmd.adapter_names() == ["a", "b", "c"]
    assert cmd.request_rate[:2] == [1.0, 2.0] and math.isinf(cmd.request_rate[2])
    assert cmd.input_len == [8, 16] and cmd.output_len == [64]
    assert cmd.slos() == {"ttft": 500.0, "tpot": 100.0}


def test_engine_flags():
    cmd = parse(BenchEngine, ["--num-adapters-list", "1", "8", "--num-seqs", "8", "--targets", "q_proj", "v_proj"])
    assert cmd.num_adapters_list == [1, 8] and cmd.targets == ["q_proj", "v_proj"] and cmd.max_loras is None


@pytest.mark.parametrize(
    "cls,args",
    [
        (BenchEngine, ["--num-adapters-list", "1", "64", "--num-seqs", "8"]),
        (BenchServe, ["--base-only", "true", "--with-base", "true"]),
        (BenchServe, ["--alpha", "1.5"]),
        (BenchServe, ["--num-requests", "0"]),
    ],
)
def test_bad_flags(cls, args: list[str]):
    with pytest.raises((ValidationError, SystemExit)):
        parse(cls, args)
