"""Refuse an adapter whose update can overflow the dtype it runs in.

    delta(x) = scale · (x·Aᵀ)·Bᵀ,  so  |delta(x)| <= |scale|·‖B‖₂·‖A‖₂ · |x|   (‖·‖₂: spectral norm)

and the low-rank intermediate |x·Aᵀ| <= ‖A‖₂·|x|. An adapter passes when that gain, and each of its
two factors, is at most sqrt(max) of the dtype (1.8e19 in float32 and bfloat16, 256 in float16): then
no activation of norm up to sqrt(max) is pushed past the dtype's range by the adapter. Trained adapters
have gains near 1. Finite values that overflow in use (lora_alpha 3e38, weights around 1e30) are
refused at load with a 400. What still overflows below the bound on some prompt stays in that request:
the engine fails it alone (LLMEngine.fail_non_finite) and the KV cache never lets it leak (kv_cache.py).
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidAdapterError
from .lora_model import LoRAModel


def max_gain(dtype: torch.dtype) -> float:
    """The largest gain an adapter may have in `dtype`: sqrt of its largest finite value."""
    return math.sqrt(torch.finfo(dtype).max)


def check_gain(model: LoRAModel, dtype: torch.dtype) -> None:
    """Raise InvalidAdapterError (400) if any projection's update can overflow `dtype`."""
    limit = max_gain(dtype)
    for (layer, module), w in sorted(model.weights.items()):
        norm_a = float(torch.linalg.matrix_norm(w.A.double(), ord=2))  # A: [r, in]
        norm_b = abs(w.scale) * float(torch.linalg.matrix_norm(w.B.double(), ord=2))  # B: [out, r]
        gain = norm_a * norm_b
        if not (norm_a <= limit and norm_b <= limit and gain <= limit):
            raise InvalidAdapterError(
                f"layer {layer} {module}: the update's gain scale·‖B‖·‖A‖ = {gain:.3g} (‖A‖ = {norm_a:.3g}, "
                f"scale·‖B‖ = {norm_b:.3g}) can overflow {str(dtype).removeprefix('torch.')}, whose limit "
                f"here is {limit:.3g}; check lora_alpha and the weights' magnitude",
                param="adapter_model",
            )
