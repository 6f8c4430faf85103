"""Weight-only quantized base weights (`--quantization int8|int4`); activations and adapters stay float.

    int8  per output channel, symmetric:  W[n, k] ≈ scales[n] · q[n, k],            q in [-127, 127]
    int4  per group of G inputs, asymmetric (gpt-fast's and llama.cpp Q4_1's scheme):
          W[n, k] ≈ q[n, k] · scales[n, g] + mins[n, g],  g = k // G,  q in [0, 15]

A `QuantizedWeight` takes a `Linear`'s float weight (or the LM head's) at load time and replaces it:
the float copy is dropped, so the projections take a quarter (int8) or about a sixth (int4, G = 32)
of their float32 bytes. Fused q/k/v and gate/up stay one weight each. The LoRA delta reads x and adds
into y (linear.py), so it does not care how W is stored.

How a step multiplies: steps of at most KERNEL_MAX_ROWS rows go to the CPU kernels (cpu_kernels.c
linear_q8/linear_q4: the weights are widened to float32 in registers, so a decode step reads 1 or
~0.75 bytes per weight instead of 4); larger steps (prefill) and machines without the kernels
dequantize the weight to a float tensor and call F.linear (for SmolLM2, ~100-230 ms a step on top of
the float32 matmul; at 64 rows the two paths measured even). torch's own weight-only ops were measured and not used: on a 2-vCPU
Xeon (SmolLM2-135M's projections and LM head, 2 threads), `torch._weight_int8pack_mm` took 55 ms per
step at 1 row and 333 at 8 against F.linear's 26 and 69 in float32, and `_weight_int4pack_mm_for_cpu`
131 and 934 ms: their cost grows with every row (`lora-serve bench quantization`, docs/benchmarks.md).
Both paths compute x·Wᵀ for W = `dequantize()`; only the rounding of the sums differs (the int4 kernel
adds each group as scale·(q·x) + min·sum(x), the same sum regrouped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Quantization
from .cpu_kernels import CPUKernels

__all__ = ["Int4Weight", "Int8Weight", "Quantization", "QuantizedWeight", "quantize_weight"]
KERNEL_MAX_ROWS = 64  # past this the kernels' arithmetic, not the weights' bytes, bounds a step: dequantize + MKL
INT4_GROUP_SIZES = (32, 64)  # G: the first that divides the input size is used (32: the closer fit, ~0.75 bytes per weight)


class QuantizedWeight(nn.Module):
    """A [out, in] weight stored quantized; `matmul(x)` is x·Wᵀ with W = `dequantize()`."""

    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized one stands for, [out, in] in `dtype` (computed in float32)."""
        raise NotImplementedError

    def kernel_matmul(self, x: torch.Tensor, kernels: CPUKernels) -> torch.Tensor:
        """x·Wᵀ through the CPU kernels: x float32 [T, in] -> [T, out]."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, kernels: CPUKernels | None) -> torch.Tensor:
        """x: [T, in] -> [T, out] in x's dtype: the kernels for small float32 CPU steps, else F.linear on the
        dequantized weight."""
        if kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] <= KERNEL_MAX_ROWS:
            return self.kernel_matmul(x if x.stride(1) == 1 else x.contiguous(), kernels)
        return F.linear(x, self.dequantize(x.dtype))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Weight(QuantizedWeight):
    q: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out]

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scales = w.abs().amax(dim=1) / 127  # [out]
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: q = 0, scale 0
        self.shape = (w.shape[0], w.shape[1])
        self.register_buffer("q", torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scales[:, None]).to(dtype)

    def kernel_matmul(self, x: torch.Tensor, kernels: CPUKernels) -> torch.Tensor:
        return kernels.linear_q8(x, self.q, self.scales)


class Int4Weight(QuantizedWeight):
    packed: torch.Tensor  # uint8 [out, in / 2]: two weights a byte
    scales: torch.Tensor  # float32 [out, in / G]
    mins: torch.Tensor  # float32 [out, in / G]

    def __init__(self, weight: torch.Tensor, group_size: int | None = None):
        super().__init__()
        w = weight.detach().float()  # [out, in]
        n, k = w.shape
        g = group_size or next((g for g in INT4_GROUP_SIZES if k % g == 0), 0)
        if g <= 0 or k % g or g % 32:
            raise ValueError(f"int4 quantization needs an input size that is a multiple of 32 (groups of 32 weights), not {k}")
        groups = w.view(n, k // g, g)
        mins = groups.amin(dim=-1)  # [out, in / G]
        scales = (groups.amax(dim=-1) - mins) / 15
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: q = 0, W = min
        q = torch.round((groups - mins[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k // 32, 32)
        self.shape = (n, k)
        self.group_size = g
        # byte j of each run of 16: weight j of the run's 32 in the low nibble, weight j + 16 in the high one
        self.register_buffer("packed", (q[..., :16] | (q[..., 16:] << 4)).view(n, k // 2).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        runs = self.packed.view(n, k // 32, 16)
        q = torch.cat([runs & 0x0F, runs >> 4], dim=-1).view(n, k // self.group_size, self.group_size).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k).to(dtype)

    def kernel_matmul(self, x: torch.Tensor, kernels: CPUKernels) -> torch.Tensor:
        return kernels.linear_q4(x, self.packed, self.scales, self.mins)


def quantize_weight(weight: torch.Tensor, method: Quantization) -> QuantizedWeight:
    """`weight` [out, in] quantized by `method`, on its device."""
    if method == "int8":
        return Int8Weight(weight)
    if method == "int4":
        return Int4Weight(weight)
    raise ValueError(f"unknown quantization {method!r}: int8 or int4")
