"""Refuse an adapter whose update can overflow the dtype it runs in.

    delta(x) = scale · (x·Aᵀ)·Bᵀ,  so  |delta(x)| <= |scale|·‖B‖₂·‖A‖₂ · |x|   (‖·‖₂: spectral norm)

and the low-rank intermediate |x·Aᵀ| <= ‖A‖₂·|x|. An adapter passes when that gain, and each of its
two factors, is at most sqrt(max) of the dtype (1.8e19 in float32 and bfloat16, 256 in float16): then
no activation of norm up to sqrt(max) is pushed past the dtype's range by the adapter. Trained adapters
have gains near 1. Finite values that overflow in use (lora_alpha 3e38, weights around 1e30) are
refused at load with a 400, and so are weights of a composition (composition.py) that break the same
bounds with each scale times |weight| (check_weighted_gain). What still overflows below the bound on some prompt stays in that request:
the engine fails it alone (LLMEngine.fail_non_finite) and the KV cache never lets it leak (kv_cache.py).
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidAdapterError
from .lora_model import Gain, LoRAModel


def max_gain(dtype: torch.dtype) -> float:
    """The largest gain an adapter may have in `dtype`: sqrt of its largest finite value."""
    return math.sqrt(torch.finfo(dtype).max)


def spectral_norms(mats: list[torch.Tensor]) -> list[float]:
    """‖M‖₂ of each matrix: the square root of the largest eigenvalue of its Gram matrix on its short side
    (r x r for a LoRA factor: A·Aᵀ for A [r, in], Bᵀ·B for B [out, r]), in float64 (where the squares of
    float32's largest values stay finite), batched by shape: one eigvalsh per shape instead of an SVD per
    matrix. An all-linear rank-16 adapter of SmolLM2-135M has 420 factors; their SVDs took ~60 ms of each
    load (2-vCPU EPYC), CPU time taken from the steps of every running request (docs/benchmarks.md,
    "Adapter loads and the collector's pauses")."""
    norms = [0.0] * len(mats)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    for (rows, cols), idx in groups.items():
        stack = torch.stack([mats[i] for i in idx]).double()  # [n, rows, cols]
        gram = stack @ stack.transpose(1, 2) if rows <= cols else stack.transpose(1, 2) @ stack
        top = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()  # eigenvalues ascending
        for i, v in zip(idx, top.tolist()):
            norms[i] = v
    return norms


def _bounds(model: LoRAModel) -> list[tuple[tuple[int, str], Gain]]:
    """Each projection's bounds, in (layer, module) order."""
    items = sorted(model.weights.items())
    norms = spectral_norms([w.A for _, w in items] + [w.B for _, w in items])
    bounds = []
    for i, (key, w) in enumerate(items):
        norm_a, norm_b = norms[i], abs(w.scale) * norms[len(items) + i]
        bounds.append((key, Gain(norm_a, norm_b, norm_a * norm_b)))
    return bounds


def _largest(a: Gain, b: Gain) -> Gain:
    return Gain(max(a.a, b.a), max(a.b, b.b), max(a.total, b.total))


def gain_of(model: LoRAModel) -> Gain:
    """The adapter's largest bounds over its projections, unchecked (an adapter registered past check_gain)."""
    most = Gain(0.0, 0.0, 0.0)
    for _, g in _bounds(model):
        most = _largest(most, g)
    return most


def check_gain(model: LoRAModel, dtype: torch.dtype) -> Gain:
    """Raise InvalidAdapterError (400) if any projection's update can overflow `dtype`; its Gain otherwise."""
    limit = max_gain(dtype)
    most = Gain(0.0, 0.0, 0.0)
    for (layer, module), g in _bounds(model):
        if not (g.a <= limit and g.b <= limit and g.total <= limit):
            raise InvalidAdapterError(
                f"layer {layer} {module}: the update's gain scale·‖B‖·‖A‖ = {g.total:.3g} (‖A‖ = {g.a:.3g}, "
                f"scale·‖B‖ = {g.b:.3g}) can overflow {str(dtype).removeprefix('torch.')}, whose limit "
                f"here is {limit:.3g}; check lora_alpha and the weights' magnitude",
                param="adapter_model",
            )
        most = _largest(most, g)
    return most


def check_weighted_gain(parts: list[tuple[str, float, Gain]], dtype: torch.dtype) -> None:
    """Raise InvalidAdapterError (400, param "adapters") if adapters composed with these weights (name,
    weight, its Gain) can overflow `dtype`: the bounds above, with each scale times |weight| and the
    composed update's gain at most the sum of its parts'."""
    limit = max_gain(dtype)
    total = sum(abs(weight) * gain.total for _, weight, gain in parts)
    worst = max(abs(weight) * gain.b for _, weight, gain in parts)
    if not (total <= limit and worst <= limit):
        raise InvalidAdapterError(
            f"these weights can overflow {str(dtype).removeprefix('torch.')}: the composed update's gain is up to "
            f"{total:.3g} (sum of |weight|·scale·‖B‖·‖A‖), and its limit here is {limit:.3g}; use smaller weights",
            param="adapters",
        )
