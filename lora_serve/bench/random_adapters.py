"""Random LoRA adapters in the PEFT on-disk format, for benchmarks (no training, no peft import)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.arch import ModelArch

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(arch: ModelArch) -> dict[str, tuple[str, int, int]]:
    """PEFT module -> (parent module, in_features, out_features)."""
    h, q, kv, n = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    return {
        "q_proj": ("self_attn", h, q),
        "k_proj": ("self_attn", h, kv),
        "v_proj": ("self_attn", h, kv),
        "o_proj": ("self_attn", q, h),
        "gate_proj": ("mlp", h, n),
        "up_proj": ("mlp", h, n),
        "down_proj": ("mlp", n, h),
    }


def write_random_adapter(path: Path, arch: ModelArch, rank: int, seed: int, targets=ALL_LINEAR, alpha: float | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(arch)
    tensors = {}
    for layer in range(arch.num_layers):
        for module in targets:
            parent, fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
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
