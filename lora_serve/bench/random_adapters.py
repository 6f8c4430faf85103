"""Random LoRA adapters in the PEFT on-disk format, for benchmarks (no training, no peft import)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lora.lora_model import projection_shapes
from ..lora.peft_config import PROJECTIONS, module_path
from ..model.arch import ModelArch

ALL_LINEAR = tuple(PROJECTIONS)  # the seven projections of a Llama block


def write_random_adapter(path: Path, arch: ModelArch, rank: int, seed: int, targets=ALL_LINEAR, alpha: float | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(arch)
    tensors = {}
    for layer in range(arch.num_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.{module_path(layer, module)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
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
