"""`lora-serve bench matmuls | quantization`: the base's matmuls, torch's against the CPU kernels and
the quantized weights against float32 (heavy imports happen inside cli_cmd)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import CliVariadicArg

from lora_serve.bench.command_base import BenchBase


class BenchMatmuls(BenchBase):
    """The base's projections and LM head: torch's F.linear vs the CPU kernels, beside the bandwidth floor."""

    rows: CliVariadicArg[list[int]] = [1, 8, 32, 128, 256]
    """Rows (tokens in the step) to time."""

    repeats: int = Field(5, ge=1)
    """Alternating torch/kernels rounds after a warm-up round (medians reported)."""

    step: bool = True
    """Also time the engine's decode step on the base at a batch of each row count, beside the floors."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import matmuls

        print(matmuls.report(matmuls.run(self.setup(), self.rows, self.repeats, self.step)))


class BenchQuantization(BenchBase):
    """The quantized base (--quantization int8|int4) vs float32: a step's matmuls, then engine decode tok/s."""

    rows: CliVariadicArg[list[int]] = [1, 8, 16, 64]
    """Rows (tokens in the step) to time the matmuls at (torch's weight-only ops only up to 16)."""

    batch: CliVariadicArg[list[int]] = [1, 8]
    """Decode batch sizes (sequences decoding together)."""

    prompt_len: int = Field(64, ge=1)
    """Prompt tokens of each sequence."""

    decode_steps: int = Field(32, ge=1)
    """Decode steps timed per round (the median step counts)."""

    repeats: int = Field(3, ge=1)
    """Rounds alternating the schemes (medians reported)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import quantization as q

        path = self.setup()
        matmuls = q.run_matmuls(path, self.rows, self.repeats)
        decode = q.run_decode(path, self.batch, self.prompt_len, self.decode_steps, self.repeats, self.seed)
        print(q.report(matmuls, decode))
