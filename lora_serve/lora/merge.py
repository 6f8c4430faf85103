"""Folding one adapter into the base weights, and restoring them bit for bit.

merge:   W[rows] = round_to_dtype(float32(W0[rows]) + scale·B·A)  for each targeted projection slice,
         after keeping a copy of exactly those rows of W0;
unmerge: W[rows] = W0[rows] from that copy. Never W - scale·B·A: subtracting drifts (in bf16,
         rotating 8 adapters 1,000 times moved weights by up to 88% of their magnitude).

While an adapter is merged, every other row of a batch (base-only, or another adapter) must
see W0 again. Rather than stall traffic to unmerge, those rows get one more low-rank term,
-scale·B·A of the merged adapter, from a dedicated slot: two rank-r products, cheap next to
a full unmerge/merge, and the switch itself happens between two engine steps.

DoRA (dora.py), as PEFT merges it: W[rows] = round_to_dtype(ratio ⊙ (float32(W0[rows]) + scale·B·A)),
ratio the adapter's own, computed against W0. Other rows see W0 again through W0·x = W·x / ratio −
scale·B·A·x: the negation first divides their base output (bias aside) by the ratio, then adds its term.

A quantized base (`--quantization`) is never merged into (QuantizedBaseError): W0 + scale·B·A
quantized again is not W0's quantization plus the adapter's delta, so the merged adapter's rows would
differ from the same adapter served unmerged, and the other rows' correction would no longer cancel.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from ..model.llama import LlamaModel
from .errors import QuantizedBaseError
from .lora_model import LoRAModel, LoRAWeights


class MergedWeights:
    def __init__(self, model: LlamaModel):
        self.model = model
        self.name: str | None = None
        self.identity: str | None = None  # the merged adapter's LoRAModel.identity: every row's K/V depends on it
        self._pristine: dict[tuple[int, str], torch.Tensor] = {}  # (layer, module) -> W0 rows
        self._lock = threading.Lock()  # merges (engine thread) against dora_norm (request threads reading adapters)

    def _rows(self, layer: int, module: str) -> torch.Tensor:
        linear = self.model.layers[layer].linear_of(module)
        if not isinstance(linear.weight, torch.Tensor):
            raise QuantizedBaseError(quantized_base_message(self.model.quantization))
        return linear.weight[linear.slice_of(module)]  # a view of the fused weight

    def _read_rows(self, layer: int, module: str) -> torch.Tensor:
        """The rows of W that a step multiplies by, to read: a quantized base's dequantized (what DoRA's
        norm is taken over: the server's base is the dequantized one, as its PEFT parity tests hold)."""
        linear = self.model.layers[layer].linear_of(module)
        if isinstance(linear.weight, torch.Tensor):
            return linear.weight[linear.slice_of(module)]
        return linear.weight.dequantize()[linear.slice_of(module)]

    @torch.no_grad()
    def merge(self, adapter: LoRAModel) -> None:
        if self.name is not None:
            self.unmerge()
        with self._lock:
            for (layer, module), w in adapter.weights.items():
                rows = self._rows(layer, module)
                self._pristine[(layer, module)] = rows.clone()
                merged = rows.float() + w.scale * _product(w, rows.device)  # [out_s, in]
                if w.ratio is not None:
                    merged.mul_(w.ratio.to(rows.device).view(-1, 1))
                rows.copy_(merged.to(rows.dtype))
            self.name = adapter.name
            self.identity = adapter.identity

    @torch.no_grad()
    def unmerge(self) -> None:
        with self._lock:
            for (layer, module), original in self._pristine.items():
                self._rows(layer, module).copy_(original)
            self._pristine.clear()
            self.name = None
            self.identity = None

    @torch.no_grad()
    def dora_norm(self, layer: int, module: str, w: LoRAWeights) -> torch.Tensor:
        """‖W0 + scale·B·A‖ per output row, in float32, of the pristine rows W0 even while merged (dora.py)."""
        with self._lock:
            pristine = self._pristine.get((layer, module))
            rows = self._read_rows(layer, module) if pristine is None else pristine
            norm = torch.linalg.vector_norm(rows.float() + w.scale * _product(w, rows.device), dim=1)  # [out_s]
        return norm.cpu()


def _product(w: LoRAWeights, device: torch.device) -> torch.Tensor:
    """B·A in float32 on `device`: [out_s, in] (float16 CPU copies too)."""
    return w.B.to(device, torch.float32) @ w.A.to(device, torch.float32)


def quantized_base_message(quantization: str | None) -> str:
    return (
        f"the base is quantized ({quantization}): merging an adapter into it cannot be exact, "
        "so adapters are served unmerged, at full precision"
    )


def negated(adapter: LoRAModel) -> list[tuple[tuple[int, str], LoRAWeights]]:
    """The adapter's terms with the sign flipped: what undoes its merge for other rows; a DoRA term
    divides the rows' base output by its ratio before (ratio_first, ratio 1 / ratio)."""
    return [
        (key, replace(w, scale=-w.scale) if w.ratio is None else replace(w, scale=-w.scale, ratio=1 / w.ratio, ratio_first=True))
        for key, w in adapter.weights.items()
    ]
