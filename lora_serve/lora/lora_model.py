"""One LoRA adapter folder in the HF PEFT format, loaded without pickle and checked against the base.

Folder (what peft `save_pretrained` writes): adapter_config.json + adapter_model.safetensors,
tensor names `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
(PEFT drops the adapter name on save; `.lora_A.{adapter}.weight` is accepted too).
  lora_A: [r, in]    lora_B: [out, r]    (nn.Linear layout: delta(x) = scale · (x·Aᵀ)·Bᵀ)
With use_dora, also `...{proj}.lora_magnitude_vector` [out] per targeted projection (dora.py).
The files are untrusted: the safetensors header is checked by hand before safetensors
parses it, its size bounded by what an adapter for this base can list (max_header_bytes)
before it is parsed, and pickled weights (.bin/.pt) are refused rather than unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..model.arch import ModelArch
from ..model.huge_pages import huge_page_buffer
from .errors import AdapterNotFoundError, InvalidAdapterError, UnsupportedMediaError
from .files import Roots, read_bytes
from .peft_config import PROJECTIONS, LoRAAdapterConfig, module_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtype -> bytes per element
# A header entry is ~130 bytes (name ~70, dtype, shape, offsets); 512 leaves room for an adapter-name infix.
HEADER_BYTES_PER_TENSOR = 512
HEADER_BASE_BYTES = 64 * 1024  # __metadata__ (PEFT writes {"format": "pt"}) and alignment padding
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\."
    r"(?P<module>\w+)\.(?:lora_(?P<half>[AB])(?:\.[\w-]+)?\.weight|lora_(?P<magnitude>magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?)"
)  # PEFT saves the magnitude as `.lora_magnitude_vector`; `.lora_magnitude_vector[.{adapter}].weight` is accepted too


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class LoRAWeights:
    """One targeted projection of one layer."""

    A: torch.Tensor  # [r, in], contiguous (float32 as loaded; packed() may hold another dtype)
    B: torch.Tensor  # [out, r], the nn.Linear layout: used as (x·Aᵀ)·Bᵀ; packed(b_transposed=True): a view of [r, out] memory
    scale: float  # alpha / r, or alpha / sqrt(r) with rslora
    magnitude: torch.Tensor | None = None  # DoRA: [out] float32, PEFT's lora_magnitude_vector (as read; None once ratio is set)
    ratio: torch.Tensor | None = None  # DoRA: [out] float32 magnitude / ‖W + scale·B·A‖ per output row (dora.py), on the CPU
    ratio_first: bool = False  # ratio scales the row's base output before the deltas, not after (a merged DoRA's negation, merge.py)


@dataclass(frozen=True)
class Gain:
    """An adapter's largest bounds over its projections (overflow.py): what a weight in a composition multiplies."""

    a: float  # ‖A‖₂
    b: float  # |scale|·‖B‖₂
    total: float  # |scale|·‖B‖₂·‖A‖₂


@dataclass(eq=False)
class LoRAModel:
    name: str
    config: LoRAAdapterConfig
    weights: dict[tuple[int, str], LoRAWeights]  # (layer, projection name)
    num_params: int  # elements of all A and B
    num_bytes: int  # size of adapter_model.safetensors
    sha256: str  # of adapter_model.safetensors
    flat: torch.Tensor | None = None  # [num_params] holding every A and B once packed (see packed())
    b_transposed: bool = False  # packed with each B stored as [r, out] (see packed())
    gain: Gain | None = None  # its update's bounds, once checked (registry.py: overflow.check_gain)
    prepared: object | None = None  # a CPU-tier copy's slot entries, built as it is loaded (residency.py's PreparedEntries)

    @classmethod
    def load(cls, name: str, path: Path, arch: ModelArch, max_rank: int, roots: Roots = None) -> LoRAModel:
        """roots: directories every file read must lie in (files.py); None: anywhere."""
        path = Path(path)
        if not path.is_dir():  # the folder's name only: a request on an adapter whose folder went may see this
            raise AdapterNotFoundError(f"adapter folder {path.name!r} does not exist", param="lora_path")
        config = LoRAAdapterConfig.from_file(path / CONFIG_FILE, arch, max_rank, roots)
        data = _read_weights_file(path, roots)  # read once: hashed and parsed from the same bytes
        check_safetensors_header(data, max_tensors(arch, config.use_dora))
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise InvalidAdapterError(f"{WEIGHTS_FILE} could not be read: {e}", param="adapter_model") from None
        weights = _collect_weights(tensors, config.targets(arch.num_layers), arch, config.use_dora)
        return cls(
            name=name,
            config=config,
            weights=weights,
            num_params=sum(w.A.numel() + w.B.numel() for w in weights.values()),
            num_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def packed(
        self,
        projections: list[tuple[int, tuple[str, ...]]],
        pin: bool = False,
        dtype: torch.dtype = torch.float32,
        b_transposed: bool = False,
    ) -> LoRAModel:
        """The same adapter with every A and B in one buffer (`flat`, of `dtype`), laid out projection by
        projection ((layer, slice names) in the base's order) as [A of each targeted slice][B of each]:
        the A rows of a fused projection's slices are then one [sum of ranks, in] view (one shrink covers
        them), and a device copy of the adapter is one copy of `flat` (residency.py). pin: page-locked
        memory, from which CUDA copies are asynchronous. b_transposed: each B stored as [r, out] (B is then
        a transposed view of it), the layout the CPU kernels read (model/cpu_kernels.c: one row of B per
        rank, added to 64 outputs at a time). Returns self when already packed that way."""
        if self.flat is not None and self.flat.is_pinned() == pin and self.flat.dtype == dtype and self.b_transposed == b_transposed:
            return self
        flat = _host_buffer(self.num_params, dtype, pin)
        weights, offset = {}, 0
        for layer, names in projections:
            keys = [(layer, n) for n in names if (layer, n) in self.weights]
            views: dict[tuple[int, str], dict[str, torch.Tensor]] = {k: {} for k in keys}
            for half in ("A", "B"):
                for key in keys:
                    src = getattr(self.weights[key], half)
                    block = flat[offset : offset + src.numel()]
                    if half == "B" and b_transposed:
                        views[key][half] = block.view(src.shape[1], src.shape[0]).copy_(src.t()).t()
                    else:
                        views[key][half] = block.view_as(src).copy_(src)
                    offset += src.numel()
            weights.update({k: replace(self.weights[k], A=v["A"], B=v["B"]) for k, v in views.items()})
        if weights.keys() != self.weights.keys():
            raise ValueError(f"adapter {self.name!r} targets projections the base does not have")
        return replace(self, weights=weights, flat=flat, b_transposed=b_transposed)

    @functools.cached_property  # a copy made with replace() computes its own
    def identity(self) -> str:
        """What the adapter computes, as a digest: the weights file's sha256 with, for every projection it
        modifies, its rank and scale as parsed from the config (alpha, rsLoRA, rank_pattern, targets all
        land there; a DoRA adapter's magnitude vectors are in that file). Equal for two names of one
        adapter, different after any change to its weights or math; the prefix cache keys K/V by it
        (engine/block_hash.py), never by the name."""
        terms = sorted((layer, module, w.A.shape[0], w.scale) for (layer, module), w in self.weights.items())
        return hashlib.sha256(json.dumps([self.sha256, terms]).encode()).hexdigest()

    def flat_offset(self, t: torch.Tensor) -> int:
        """Where tensor `t` (a view of `flat`) starts in `flat`, in elements."""
        assert self.flat is not None
        return int(t.storage_offset() - self.flat.storage_offset())  # int: torch's stubs allow a SymInt

    def size_vs_base(self, base_params: int) -> dict[str, Any]:
        if base_params <= 0:
            raise ValueError(f"base_params must be positive, got {base_params}")
        return {
            "params": self.num_params,
            "bytes": self.num_bytes,
            "base_params": base_params,
            "ratio": self.num_params / base_params,
        }


# Copies this large go in huge pages (model/huge_pages.py), where a decode step's LoRA calls read them
# ~6% faster; a mapping of its own rounds each up to whole 2 MiB pages, at most a quarter more here.
HUGE_PAGE_MIN_BYTES = 8 << 20


def _host_buffer(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised CPU tensor for a packed copy: page-locked (pin), in huge pages where it is large and
    the system gives them, else torch's own."""
    nbytes = numel * dtype.itemsize
    huge = huge_page_buffer(nbytes) if not pin and nbytes >= HUGE_PAGE_MIN_BYTES else None
    return torch.empty(numel, dtype=dtype, pin_memory=pin) if huge is None else huge.view(dtype)


def projection_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """Projection name -> (in_features, out_features) of the base model."""
    h, i = arch.hidden_size, arch.intermediate_size
    return {
        "q_proj": (h, arch.q_size),
        "k_proj": (h, arch.kv_size),
        "v_proj": (h, arch.kv_size),
        "o_proj": (arch.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def max_tensors(arch: ModelArch, dora: bool = False) -> int:
    """Most tensors an adapter for this base can hold: lora_A and lora_B (and with DoRA the magnitude)
    of every projection of every layer."""
    return (3 if dora else 2) * len(PROJECTIONS) * arch.num_layers


def max_header_bytes(num_tensors: int) -> int:
    return HEADER_BASE_BYTES + HEADER_BYTES_PER_TENSOR * num_tensors


def check_safetensors_header(data: bytes, num_tensors: int) -> dict[str, dict[str, Any]]:
    """Check the layout [u64 LE n][n bytes of JSON header][tensor data] of a file that may hold at most
    num_tensors tensors; returns name -> entry. n is bounded before the header is parsed."""

    def malformed(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {why}", param="adapter_model")

    if len(data) < 8:
        raise malformed(f"{len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise malformed(f"header length {n} is larger than the file ({len(data)} bytes)")
    limit = max_header_bytes(num_tensors)
    if n > limit:
        raise malformed(f"the header has {n} bytes; an adapter for this base model has at most {limit}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise malformed("the header is not valid JSON") from None
    except RecursionError:
        raise malformed("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise malformed("the header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > num_tensors:
        raise malformed(f"the header lists {len(header)} tensors; an adapter for this base has at most {num_tensors}")
    data_size = len(data) - 8 - n
    for name, entry in header.items():
        if not _is_entry(entry):
            raise malformed(f"bad header entry for {name!r}")
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in FLOAT_DTYPES:
            msg = f"tensor {name!r} has dtype {dtype}; LoRA weights must be one of {', '.join(FLOAT_DTYPES)}"
            raise InvalidAdapterError(msg, param=name)
        if not 0 <= begin <= end <= data_size:
            raise malformed(f"the data of {name!r} lies outside the file (truncated?)")
        if end - begin != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise malformed(f"the data size of {name!r} does not match its shape {shape}")
    return header


def _is_entry(entry: Any) -> bool:
    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and ints(entry.get("shape"))
        and ints(entry.get("data_offsets"))
        and len(entry["data_offsets"]) == 2
    )


def _read_weights_file(folder: Path, roots: Roots) -> bytes:
    weights_file = folder / WEIGHTS_FILE
    if weights_file.is_file():
        return read_bytes(weights_file, roots)
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        msg = f"only {WEIGHTS_FILE} is accepted; pickled weights ({', '.join(pickled)}) are refused"
        raise UnsupportedMediaError(msg, param="adapter_model")
    raise InvalidAdapterError(f"{WEIGHTS_FILE} not found in the adapter folder", param="adapter_model")


def _collect_weights(
    tensors: dict[str, torch.Tensor], targets: dict[tuple[int, str], tuple[int, float]], arch: ModelArch, dora: bool
) -> dict[tuple[int, str], LoRAWeights]:
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        key, half = _parse_tensor_name(name, targets, arch.num_layers, dora)
        pair = pairs.setdefault(key, {})
        if half in pair:
            raise InvalidAdapterError(f"tensor {name!r} duplicates {pair[half][0]!r}", param=name)
        pair[half] = (name, tensor)
    shapes = projection_shapes(arch)
    weights = {}
    for (layer, module), (r, scale) in targets.items():
        in_features, out_features = shapes[module]
        pair = pairs.get((layer, module), {})
        A = _checked_tensor(pair, "A", layer, module, (r, in_features))
        B = _checked_tensor(pair, "B", layer, module, (out_features, r))
        magnitude = _checked_tensor(pair, "magnitude_vector", layer, module, (out_features,)) if dora else None
        weights[(layer, module)] = LoRAWeights(A=A, B=B, scale=scale, magnitude=magnitude)
    return weights


def _parse_tensor_name(name: str, targets: dict, num_layers: int, dora: bool) -> tuple[tuple[int, str], str]:
    m = TENSOR_NAME.fullmatch(name)
    if m is None or PROJECTIONS.get(m["module"]) != m["group"]:
        msg = f"unexpected tensor {name!r}: not the lora_A/lora_B weight or DoRA lora_magnitude_vector of a {'/'.join(PROJECTIONS)} projection"
        raise InvalidAdapterError(msg, param=name)
    if m["magnitude"] and not dora:
        raise InvalidAdapterError(f"tensor {name!r} is a DoRA magnitude vector, but adapter_config.json has no use_dora", param=name)
    layer, module = int(m["layer"]), m["module"]
    if layer >= num_layers:
        raise InvalidAdapterError(f"tensor {name!r} is for layer {layer}; the base has {num_layers} layers", param=name)
    if (layer, module) not in targets:
        raise InvalidAdapterError(f"tensor {name!r} is for a module adapter_config.json does not target", param=name)
    return (layer, module), m["half"] or m["magnitude"]


def _checked_tensor(pair: dict, half: str, layer: int, module: str, shape: tuple[int, ...]) -> torch.Tensor:
    if half not in pair:
        name = f"base_model.model.{module_path(layer, module)}.lora_{half}" + ("" if half == "magnitude_vector" else ".weight")
        why = " with use_dora" if half == "magnitude_vector" else ""
        raise InvalidAdapterError(f"tensor {name!r} is missing; adapter_config.json targets {module}{why}", param=name)
    name, tensor = pair[half]
    if tuple(tensor.shape) != shape:
        msg = f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)} for this base model and rank"
        raise InvalidAdapterError(msg, param=name)
    tensor = tensor.to(torch.float32).contiguous()  # F64 may overflow here, so check after
    if not torch.isfinite(tensor).all():
        raise InvalidAdapterError(f"tensor {name!r} contains NaN or Inf", param=name)
    return tensor
