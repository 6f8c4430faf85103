"""What `lora-serve train` trains: one typed config, checked when built.

Every field is a kebab-case flag of `lora-serve train` with its docstring as help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import CliVariadicArg

from ..lora.peft_config import ALL_LINEAR, PROJECTIONS

SaveDtype = Literal["float16", "bfloat16", "float32"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """Base model: a local Hugging Face directory (Llama 3.x, Qwen2/2.5, Mistral, SmolLM). Empty: the embedded SmolLM2-135M-Instruct."""

    output_dir: Path = Path("adapter")
    """Folder the adapter is written to (adapter_config.json + adapter_model.safetensors); created if missing."""

    r: int = Field(8, ge=1, le=1024)
    """LoRA rank."""

    lora_alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the update is scaled by alpha / r."""

    target_modules: CliVariadicArg[list[str]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Projections to adapt (space- or comma-separated): any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear."""

    use_dora: bool = False
    """Train a DoRA adapter (PEFT's use_dora): a magnitude vector per projection is trained with A and B, and each output row is rescaled by it."""

    top_layers: int | None = Field(None, ge=1)
    """Adapt only the last N decoder layers (default: all). Cheaper to train: the backward pass stops at the lowest adapted layer."""

    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input during training (0: none, and fully deterministic batches)."""

    learning_rate: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate; it decays linearly to zero over the run."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA weights."""

    epochs: int = Field(3, ge=1)
    """Passes over the data (ignored when --max-steps is given)."""

    max_steps: int | None = Field(None, ge=1)
    """Optimiser steps to run, cycling through the data; overrides --epochs."""

    batch_size: int = Field(8, ge=1)
    """Examples per optimiser step."""

    max_length: int = Field(512, ge=8)
    """Tokens per example; longer ones are cut at the end (an example left with no assistant token is skipped)."""

    seed: int = 0
    """Seed for the LoRA initialisation, shuffling and dropout: the same seed gives the same adapter bytes."""

    dtype: SaveDtype = "float16"
    """dtype of the saved LoRA weights (training runs in float32)."""

    num_threads: int | None = Field(None, ge=1)
    """CPU threads for torch (default: torch's choice)."""

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        if value == [ALL_LINEAR]:
            return list(PROJECTIONS)
        unknown = [m for m in value if m not in PROJECTIONS]
        if unknown or not value:
            raise ValueError(f"target_modules {unknown or value} must be among {', '.join(PROJECTIONS)} (or {ALL_LINEAR})")
        return value
