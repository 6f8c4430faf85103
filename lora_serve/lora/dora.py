"""DoRA adapters (PEFT `use_dora=True`; Liu et al. 2024, arXiv:2402.09353), as PEFT 0.21 computes them
(peft/tuners/lora/dora.py: DoraLinearLayer.forward; variants.py: DoraLinearVariant.merge_*):

    y = bias + ratio ⊙ (W·x + scale·B·A·x),    ratio = m / ‖W + scale·B·A‖_row    ([out] per projection slice)

m is the adapter's lora_magnitude_vector and the norm is over each output row of the updated weight,
detached. W is frozen, so ratio is a constant per adapter and targeted slice: it is computed here once,
when the adapter is read from disk (AdapterRegistry.validate, on a request thread, never the engine's),
in float32 against the pristine base (while an adapter is merged, the rows it changed are read from the
copy merge.py keeps), and it stays with the adapter's CPU copy: one [out] float32 vector per targeted
slice. Reading it at load rather than when it becomes resident means an adapter evicted from the device
and brought back costs nothing; one evicted from CPU memory is read again, and its ratio computed again.

In a batch, the backends add scale·B·A·x as for any adapter, then scale the rows of a DoRA adapter's
segment by ratio, leaving the bias out (ops/rescale.py). Merged: W' = ratio ⊙ (W + scale·B·A) (merge.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from .errors import InvalidAdapterError
from .lora_model import LoRAModel, LoRAWeights
from .overflow import max_gain


class BaseNorms(Protocol):
    """The base model, as DoRA reads it (merge.py's MergedWeights)."""

    def dora_norm(self, layer: int, module: str, w: LoRAWeights) -> torch.Tensor:
        """‖W + scale·B·A‖ of each output row of the pristine base's slice `module`: [out] float32 on the CPU."""
        ...


def with_ratios(model: LoRAModel, base: BaseNorms, dtype: torch.dtype) -> LoRAModel:
    """The DoRA adapter with every projection's ratio set. InvalidAdapterError (400) when a ratio is not
    finite (a row of W + scale·B·A of norm 0) or larger than the dtype's max_gain (overflow.py): the
    ratio multiplies the base's output, so it is held to the bound an adapter's update is."""
    limit = max_gain(dtype)
    weights = {}
    for (layer, module), w in sorted(model.weights.items()):
        assert w.magnitude is not None, "lora_model.py reads a magnitude for every projection of a DoRA adapter"
        ratio = w.magnitude / base.dora_norm(layer, module, w)  # [out]
        largest = float(ratio.abs().max())
        if not largest <= limit:  # NaN too
            raise InvalidAdapterError(
                f"layer {layer} {module}: the DoRA scale lora_magnitude_vector / ‖W + scale·B·A‖ reaches {largest:.3g}, "
                f"beyond what {str(dtype).removeprefix('torch.')} holds here ({limit:.3g}); check the magnitude vector",
                param="adapter_model",
            )
        weights[(layer, module)] = replace(w, ratio=ratio, magnitude=None)  # m is in the ratio now: one [out] vector kept
    return replace(model, weights=weights)
