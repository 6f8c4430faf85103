"""`lora-serve bench compose`: a decode batch where some rows compose two adapters (the `adapters` field)
vs the same rows on one adapter each (the measurement: composed_batch.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lora_serve.bench.command_base import BenchBase


class BenchCompose(BenchBase):
    """Weighted composition: decode step time and tok/s with composed rows vs one adapter per row, and their ratio."""

    num_seqs: int = Field(32, ge=2)
    """Rows in the batch, each on an adapter of its own (random, PEFT format)."""

    num_composed: int = Field(8, ge=1)
    """Rows among them that compose their adapter (weight 0.7) with another row's (0.5)."""

    rank: int = Field(16, ge=1)
    """Adapter rank (all seven projections)."""

    prompt_len: int = Field(64, ge=1)
    """Prompt tokens per row (random ids)."""

    decode_steps: int = Field(16, ge=1)
    """Decode steps timed after the prefill step."""

    repeats: int = Field(3, ge=1)
    """Rounds after a warm-up, each both configurations back to back (medians are reported)."""

    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Adapter weight dtype in the slots (serve's --lora-dtype; auto as there)."""

    @model_validator(mode="after")
    def _check_rows(self) -> BenchCompose:
        if self.num_composed > self.num_seqs // 2:
            raise ValueError(f"--num-composed ({self.num_composed}) must be <= --num-seqs / 2 ({self.num_seqs // 2})")
        return self

    def cli_cmd(self) -> None:
        from lora_serve.bench import composed_batch

        result = composed_batch.run(
            self.setup(), self.num_seqs, self.num_composed, self.rank,
            self.prompt_len, self.decode_steps, self.repeats, self.seed, self.lora_dtype,
        )  # fmt: skip
        print(composed_batch.report(result))
