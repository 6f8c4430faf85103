"""`lora-serve bench ...`: the benchmark subcommands (heavy imports happen inside cli_cmd)."""

from __future__ import annotations

import os
import platform

from pydantic import BaseModel, ConfigDict
from pydantic_settings import CliApp, CliSubCommand


class _BenchBase(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    model: str | None = None
    """Base model directory (default: the embedded SmolLM2-135M-Instruct)."""

    seed: int = 0
    """Seed for prompts and adapters."""

    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""

    def _setup(self):
        import torch

        from lora_serve.model.default_model import resolve_model_path

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        path = resolve_model_path(self.model)
        print(f"# model {path.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {_hardware()}")
        return path


class BenchThroughput(_BenchBase):
    """Engine token throughput vs transformers' generate (one at a time, and one padded batch)."""

    concurrency: list[int] = [1, 8, 32]
    """Numbers of concurrent requests to measure."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import throughput

        rows = throughput.run(self._setup(), self.concurrency, self.seed)
        print(throughput.report(rows))


class BenchLoRA(_BenchBase):
    """Mixed-adapter batches vs the bare base, and vs HF PEFT's mixed batch (adapter_names)."""

    num_seqs: int = 32
    """Sequences in the batch."""

    num_adapters: int = 32
    """Distinct adapters among them (random, PEFT format)."""

    rank: int = 16
    """Adapter rank (all seven projections are targeted)."""

    prompt_len: int = 64
    """Prompt tokens per sequence."""

    decode_steps: int = 16
    """Decode steps timed after the prefill step."""

    repeats: int = 3
    """Alternating base/mixed repetitions (medians are reported)."""

    peft: bool = True
    """Also run the workload through HF PEFT."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import mixed_lora

        result = mixed_lora.run(
            self._setup(), self.num_seqs, self.num_adapters, self.rank, self.prompt_len, self.decode_steps,
            self.repeats, self.peft, self.seed,
        )
        print(mixed_lora.report(result, self.num_adapters))


class BenchCommand(BaseModel):
    """Benchmarks, measured side by side in one run (ratios are what to compare across machines)."""

    throughput: CliSubCommand[BenchThroughput]
    """Engine vs transformers generate."""

    lora: CliSubCommand[BenchLoRA]
    """Mixed adapters vs base, and vs PEFT."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"
