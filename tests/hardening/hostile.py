"""Hostile adapter uploads built from a real PEFT adapter: finite values that overflow in use, an
adapter just inside the overflow bound (accepted: what it computes must stay in its own requests),
and a config nested past any parser's recursion limit."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, save

from lora_serve.lora.lora_model import CONFIG_FILE, WEIGHTS_FILE


def _files(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {"adapter_config": json.dumps(config).encode(), "adapter_model": save(tensors)}


def _edited(src: Path, config_edit: Callable[[dict], None] | None = None, tensor_edit=None) -> dict[str, bytes]:
    config = json.loads((src / CONFIG_FILE).read_text())
    tensors = load((src / WEIGHTS_FILE).read_bytes())
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensors = {name: tensor_edit(name, t, config) for name, t in tensors.items()}
    return _files(config, tensors)


def edge_of_bound(src: Path, dtype: torch.dtype, fraction: float = 0.5) -> dict[str, bytes]:
    """Every projection's B scaled so that scale·‖B‖·‖A‖ is `fraction` of the limit in `dtype`, the
    narrowest the server runs adapters in (sqrt of its largest value: 1.8e19 in float32, 256 in float16)."""
    config = json.loads((src / CONFIG_FILE).read_text())
    tensors = load((src / WEIGHTS_FILE).read_bytes())
    scale = config["lora_alpha"] / config["r"]
    limit = math.sqrt(torch.finfo(dtype).max)
    for name in [n for n in tensors if ".lora_A." in n]:
        b_name = name.replace(".lora_A.", ".lora_B.")
        A, B = tensors[name].double(), tensors[b_name].double()
        gain = scale * torch.linalg.matrix_norm(A, ord=2) * torch.linalg.matrix_norm(B, ord=2)
        tensors[b_name] = (B * (fraction * limit / gain)).float()
    return _files(config, tensors)


def refused_uploads(src: Path) -> dict[str, dict[str, bytes]]:
    """id -> upload files that must get a 4xx."""
    huge = lambda name, t, config: t * (1e30 / t.abs().max())  # noqa: E731  entries around 1e30
    nested = {"adapter_config": b"[" * 100_000, "adapter_model": (src / WEIGHTS_FILE).read_bytes()}
    return {
        "lora_alpha 3e38": _edited(src, config_edit=lambda c: c.update(lora_alpha=3e38)),
        "weights around 1e30": _edited(src, tensor_edit=huge),
        "config nested 100k deep": nested,
    }
