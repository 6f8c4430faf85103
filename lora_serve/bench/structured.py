"""`lora-serve bench structured`: a mixed batch, half its rows each held to a JSON schema of its own, half free,
over several adapters, vs the same rows with no constraint (the measurement: constrained_batch.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from lora_serve.bench.command_base import BenchBase


class BenchStructured(BenchBase):
    """Structured outputs: the free rows' TPOT beside constrained rows vs in a batch with none, and the masks' cost per step."""

    batch: int = Field(32, ge=1)
    """Rows in the batch, all submitted at once."""

    constrained: int = Field(16, ge=0)
    """Rows among them each held to a generated JSON schema of its own (the rest are free)."""

    num_adapters: int = Field(8, ge=0)
    """Random adapters (in memory) the rows are spread over, row i on adapter i mod N (0: every row on the base)."""

    rank: int = Field(16, ge=1)
    """Adapter rank (all seven projections)."""

    prompt_len: int = Field(32, ge=1)
    """Prompt tokens per row (random ids)."""

    output_len: int = Field(32, ge=2)
    """Greedy output tokens per row; the decode steps after the first are timed."""

    rounds: int = Field(3, ge=1)
    """Rounds after a warm-up, each the mixed batch and the free one back to back (medians are reported)."""

    @model_validator(mode="after")
    def _check_rows(self) -> BenchStructured:
        if self.constrained > self.batch:
            raise ValueError(f"--constrained ({self.constrained}) must be <= --batch ({self.batch})")
        return self

    def cli_cmd(self) -> None:
        from lora_serve.bench import constrained_batch

        result = constrained_batch.run(
            self.setup(), self.batch, self.constrained, self.num_adapters, self.rank,
            self.prompt_len, self.output_len, self.rounds, self.seed,
        )  # fmt: skip
        print(constrained_batch.report(result))
