"""Random LoRA adapters for benchmarks (no training, no peft import): in the PEFT on-disk format, or in memory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lora.lora_model import LoRAModel, LoRAWeights, projection_shapes
from ..lora.peft_config import PROJECTIONS, LoRAAdapterConfig, module_path
from ..model.arch import ModelArch

ALL_LINEAR = tuple(PROJECTIONS)  # the seven projections of a Llama block


def _random_pairs(arch: ModelArch, rank: int, seed: int, targets) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer, module, A [r, in], B [out, r]) for every targeted projection; B small so outputs stay fluent."""
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(arch)
    for layer in range(arch.num_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            yield layer, module, torch.randn(rank, fan_in, generator=g) / fan_in**0.5, torch.randn(fan_out, rank, generator=g) * 0.01


def write_random_adapter(path: Path, arch: ModelArch, rank: int, seed: int, targets=ALL_LINEAR, alpha: float | None = None) -> Path:
    tensors = {}
    for layer, module, A, B in _random_pairs(arch, rank, seed, targets):
        prefix = f"base_model.model.{module_path(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = A
        tensors[f"{prefix}.lora_B.weight"] = B
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def random_lora_model(name: str, arch: ModelArch, rank: int, seed: int, targets=ALL_LINEAR) -> LoRAModel:
    """The adapter write_random_adapter would write (alpha = 2r), built in memory: nothing touches the disk."""
    weights = {(layer, module): LoRAWeights(A, B, 2.0) for layer, module, A, B in _random_pairs(arch, rank, seed, targets)}
    return LoRAModel(
        name=name,
        config=LoRAAdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=tuple(targets)),
        weights=weights,
        num_params=sum(w.A.numel() + w.B.numel() for w in weights.values()),
        num_bytes=0,
        # Its weights are a function of these: a digest of them names its content (LoRAModel.identity).
        sha256=hashlib.sha256(repr(("random", arch, rank, seed, tuple(targets))).encode()).hexdigest(),
    )
