"""Load HF safetensors checkpoints into `LlamaModel`, fusing q/k/v and gate/up on the way
(or, for benchmarks of a shape alone, fill one with random weights: `random_model`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open

from ..config_fields import Dtype
from .arch import ModelArch, UnsupportedModelError
from .linear import Linear
from .llama import LlamaModel, RMSNorm

# HF name (after "model.layers.N.") -> (our module path, slice name or None)
_LAYER_NAMES = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q_proj"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k_proj"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj", "o_proj"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up_proj"),
    "mlp.down_proj": ("mlp.down_proj", "down_proj"),
    "input_layernorm": ("input_layernorm", None),
    "post_attention_layernorm": ("post_attention_layernorm", None),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


DTYPE_NAMES: dict[torch.dtype, Dtype] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES: dict[Dtype, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def torch_dtype(name: Dtype) -> torch.dtype:
    """The dtype a resolved config names (engine/resolve.py turns "auto" into one of DTYPES)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}: the config is resolved first (engine/resolve.py)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> Dtype:
    """The config's name for a model's or the slots' dtype."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return DTYPE_NAMES[dtype]


def checkpoint_files(path: Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    return files


def _target(model: LlamaModel, name: str) -> tuple[torch.Tensor, slice | None] | None:
    """The parameter (and row slice of it) that HF tensor `name` fills, or None to skip it."""
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight, None
    if name == "model.norm.weight":
        return model.norm.weight, None
    if name == "lm_head.weight":
        return None if model.arch.tie_word_embeddings else (cast(torch.Tensor, model.lm_head_weight), None)  # a float model
    m = _LAYER_RE.match(name)
    if m is None:
        return None  # e.g. rotary_emb.inv_freq in old checkpoints
    layer, hf_module, kind = int(m.group(1)), m.group(2), m.group(3)
    if hf_module not in _LAYER_NAMES or layer >= len(model.layers):
        return None
    path, slice_name = _LAYER_NAMES[hf_module]
    module = model.layers[layer].get_submodule(path)
    param = getattr(module, kind)  # a float model's: quantize() runs after loading
    if param is None:
        raise UnsupportedModelError(f"checkpoint has {name} but the architecture declares no such bias")
    return param, (cast(Linear, module).slice_of(slice_name) if slice_name else None)  # a sliced module is a Linear


@torch.no_grad()
def load_model(path: Path, dtype: torch.dtype, device: torch.device, max_len: int) -> LlamaModel:
    arch = ModelArch.from_dir(path)
    model = LlamaModel(arch, max_len, dtype, device)
    filled: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                target = _target(model, name)
                if target is None:
                    continue
                param, rows = target
                tensor = f.get_tensor(name)
                dest = param if rows is None else param[rows]
                if dest.shape != tensor.shape:
                    raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(dest.shape)}")
                dest.copy_(tensor)
                filled.add(name)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not arch.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i in range(arch.num_layers):
        expected.update(f"model.layers.{i}.{m}.weight" for m in _LAYER_NAMES)
    missing = sorted(expected - filled)
    if missing:
        raise UnsupportedModelError(f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()


@torch.no_grad()
def random_model(arch: ModelArch, dtype: torch.dtype, device: torch.device, max_len: int, seed: int = 0) -> LlamaModel:
    """A model of `arch`'s shape with random weights drawn on the device: no checkpoint is written or read,
    so an 8B shape costs seconds. Norms are ones; matrices N(0, 1/fan_in), so activations stay O(1)."""
    model = LlamaModel(arch, max_len, dtype, device)
    g = torch.Generator(device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for param in model.parameters():
        if id(param) not in norms:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=g)
    return model.eval()
