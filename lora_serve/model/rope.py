"""Rotary position embeddings: default, linear and Llama 3 frequency scaling.

Reference: Su et al. 2021 (RoFormer); Llama 3 scaling as published with Llama 3.1
(low frequencies divided by `factor`, high kept, a smooth ramp between).
"""

from __future__ import annotations

import math

import torch

from .arch import ModelArch


def inv_frequencies(arch: ModelArch) -> torch.Tensor:
    """[head_dim // 2] float64 inverse frequencies after scaling."""
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = arch.rope_scaling
    kind = s.get("rope_type")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(is_mid, mid, scaled)
    return inv


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; applies the rotate-half convention used by HF Llama checkpoints."""

    cos: torch.Tensor  # [max_len, head_dim] buffers, registered in __init__
    sin: torch.Tensor

    def __init__(self, arch: ModelArch, max_len: int, device: torch.device):
        super().__init__()
        inv = inv_frequencies(arch)
        t = torch.arange(max_len, dtype=torch.float64)
        freqs = torch.outer(t, inv)  # [max_len, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, head_dim]
        self.register_buffer("cos", emb.cos().float().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().float().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, KV, D]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(dtype)
