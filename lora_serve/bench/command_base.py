"""What every `lora-serve bench` command that runs a model takes: the model, a seed, torch's threads."""

from __future__ import annotations

import os
import platform

from pydantic import BaseModel, ConfigDict


class BenchBase(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    model: str | None = None
    """Base model directory (default: the embedded SmolLM2-135M-Instruct)."""

    seed: int = 0
    """Seed for prompts and adapters."""

    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""

    def setup(self):
        import torch

        from lora_serve.model.default_model import resolve_model_path

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        path = resolve_model_path(self.model)
        print(f"# model {path.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {hardware()}")
        return path


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"
