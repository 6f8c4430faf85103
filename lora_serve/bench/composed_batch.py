"""Composition's cost in a decode batch: the same rows, each on one adapter, vs some composing two, in one run.

    lora-serve bench compose --num-seqs 32 --num-composed 8 --rank 16

Both configurations run the same N prompts of equal length over N random adapters of rank r on all seven
projections (row i on adapter i). In the second, each of the last `num_composed` rows composes its own
adapter at weight 0.7 with the adapter of the row `num_composed` places before it at 0.5
(lora/composition.py): the batch reads the same N adapters, and those rows add one rank-r term each. Decode =
the median of the full-batch decode steps after the prefill step; the configurations alternate `repeats`
times after a warm-up round, and the ratio is taken within each round (paired, so that a slow spell of a
shared machine hits both sides), its median and range reported.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config_fields import Dtype
from ..lora.composition import Composition
from .mixed_lora import Configs, build_engine, interleave, summarise
from .runners import engine_phases, random_prompts
from .table import markdown_table

ONE_EACH = "one adapter per row"


def run(
    model_path: Path,
    num_seqs: int = 32,
    num_composed: int = 8,
    rank: int = 16,
    prompt_len: int = 64,
    decode_steps: int = 16,
    repeats: int = 3,
    seed: int = 0,
    lora_dtype: Dtype = "auto",
) -> dict:
    if not 0 < num_composed <= num_seqs // 2:
        raise ValueError(
            f"num_composed ({num_composed}) must lie in [1, num_seqs / 2 = {num_seqs // 2}]: each composes a second row's adapter"
        )
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(model_path, Path(tmp), num_seqs, rank, num_seqs, prompt_len + decode_steps + 8, lora_dtype=lora_dtype)
        names = [f"bench-{i}" for i in range(num_seqs)]
        prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * num_seqs, seed)
        composed: list[str | Composition | None] = list(names)
        for i in range(num_seqs - num_composed, num_seqs):
            composed[i] = Composition.of({names[i]: 0.7, names[i - num_composed]: 0.5})
        configs: Configs = {ONE_EACH: (names, None), f"{num_composed} rows compose two": (composed, None)}

        def measure(loras: Sequence[str | Composition | None], warm_up: bool) -> object:
            return engine_phases(engine, prompts, 2 if warm_up else decode_steps, loras)

        result = summarise(interleave(engine, configs, repeats, measure), ONE_EACH)
    for r in result.values():
        r["decode_step_ms"] = 1e3 * num_seqs / r["decode_tok_s"]
    return result


def report(result: dict) -> str:
    rows = []
    for label, r in result.items():
        lo, hi = r["decode_ratio_range"]
        rows.append([label, f"{r['decode_step_ms']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_ratio']:.2f} ({lo:.2f}-{hi:.2f})"])
    header = ["configuration", "decode step ms (median)", "decode tok/s", f"vs {ONE_EACH} (range over rounds)"]
    return markdown_table(header, rows)
