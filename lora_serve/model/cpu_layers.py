"""Every decoder layer of a step in one call to the CPU kernels' library (cpu_layers.c), for the steps it
covers; the others run layer by layer in llama.py, as before.

A step qualifies when the model is float32 on the CPU with the kernels on and not quantized, every
attention group is a decode or a prefill chunk the attention kernels read in place, and its LoRA batch,
if any, adds each projection's deltas in one kernel call over one pass of segments
(LoRABatch.kernel_segments) with no DoRA ratio to apply. The C loop calls what llama.py's path calls,
with the same operands, in the same order: the same bits. That includes the matmuls of a step with more
rows than the kernels take (kernel_rows.py): those go to the BLAS sgemm F.linear calls, whose address
torch's CPU library exports (MKL's on x86-64; where it exports none, such steps go layer by layer).

What the checks of the per-layer path did, this does once per step (the operands every layer shares)
or once per model (weights, caches, slot tables: rebuilt when the caches move).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .arch import ModelArch
from .attention import CHUNK_KERNEL_MAX_QUERIES, AttentionMetadata
from .cpu_kernels import CPUKernels
from .kernel_rows import bucket_of
from .linear import Linear, LoRABatch


class DecoderModel(Protocol):
    """What this reads of llama.py's LlamaModel (which holds one of these: typed here, not imported)."""

    arch: ModelArch
    quantization: Any  # None unless quantized
    kernels: CPUKernels | None
    kernel_buckets: frozenset[int]
    layers: Sequence[Any]  # DecoderLayer


LAYER_ARGS = 13  # cpu_layers.c's enum of a layer's arguments (the step's 23 are in the order of its other enum)
_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int


def _f32(t: torch.Tensor, shape: tuple[int, ...]) -> int:
    """t's address, once it is a contiguous float32 CPU tensor of `shape`; else a ValueError."""
    if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(f"decoder layers: a {tuple(t.shape)} {t.dtype} tensor where float32 {shape} is read")
    return t.data_ptr()


def _i64(t: torch.Tensor, numel: int | None = None) -> bool:
    return t.dtype is torch.int64 and t.is_cpu and t.is_contiguous() and (numel is None or t.numel() == numel)


@functools.cache
def blas_sgemm() -> int:
    """The address of the sgemm_ torch's CPU library exports (what F.linear multiplies float32 with past the
    kernels' rows: the same bits, tests/model/test_cpu_layers.py); 0 where it exports none."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0


class CPUDecoderLayers:
    def __init__(self, lib: ctypes.CDLL, model: DecoderModel):  # the CPU kernels' library
        self._run = lib.decoder_layers
        self._run.argtypes = [_L, _P, _P, _L, _P, _F, _F, _I]
        self._run.restype = ctypes.c_int
        self.model = model
        self._layers: np.ndarray | None = None  # [L, LAYER_ARGS]
        self._key: tuple[int, ...] = ()
        self._slots: list = []  # every projection's lora_slots (None where it has none)
        self.calls = 0  # steps run here (tests count them)

    def _layer_args(self) -> np.ndarray:
        """The per-layer addresses, built again when the caches or the weights moved (a new engine's caches)."""
        m = self.model
        first, last = m.layers[0], m.layers[-1]
        key = (first.self_attn.attn.k_cache.data_ptr(), last.self_attn.attn.v_cache.data_ptr(), id(first.self_attn.qkv_proj.lora_slots),
               id(first.self_attn.qkv_proj.weight), id(last.mlp.down_proj.weight))  # fmt: skip
        if self._layers is not None and key == self._key:
            return self._layers
        a, D = m.arch, m.arch.hidden_size
        rope = first.self_attn.rope
        for table in (rope.cos, rope.sin):  # [max_len, head_dim]: run() passes their addresses unchecked
            _f32(table, (rope.cos.shape[0], a.head_dim))
        nqkv, cache = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim, (a.num_kv_heads, a.head_dim)
        rows, self._slots = [], []
        for layer in m.layers:
            sa = layer.self_attn
            linears: tuple[Linear, ...] = layer.linears()
            shapes = [(nqkv, D), (D, a.num_heads * a.head_dim), (2 * a.intermediate_size, D), (D, a.intermediate_size)]
            weights = [_f32(lin.weight, s) for lin, s in zip(linears, shapes)]  # type: ignore[arg-type]
            k, v = sa.attn.k_cache, sa.attn.v_cache
            caches = [_f32(c, (k.shape[0], *cache)) for c in (k, v)]
            bias = 0 if sa.qkv_proj.bias is None else _f32(sa.qkv_proj.bias, (nqkv,))
            tables = []
            for lin in linears:
                slots = lin.lora_slots
                self._slots.append(slots)
                table = None if slots is None else slots.kernel_table
                tables.append(0 if table is None else table.arg_array.ctypes.data)
            norms = [_f32(layer.input_layernorm.weight, (D,)), _f32(layer.post_attention_layernorm.weight, (D,))]
            rows.append([*norms, weights[0], bias, *weights[1:], *caches, *tables])
        self._layers, self._key = np.array(rows, dtype=np.int64).reshape(-1, LAYER_ARGS), key
        return self._layers

    def run(self, x: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None) -> torch.Tensor | None:
        """Run every layer on x [T, hidden] (the residual stream, updated in place) and return the last MLP's
        output [T, hidden], not yet added to x (llama.py's `pending`); None, having done nothing, when the
        step is not one this covers."""
        m = self.model
        T = x.shape[0]
        on_kernels = bucket_of(T) in m.kernel_buckets
        sgemm = 0 if on_kernels else blas_sgemm()  # past the kernels' rows: BLAS, as F.linear
        if (m.quantization is not None or m.kernels is None or x.dtype is not torch.float32 or not x.is_cpu
                or not x.is_contiguous() or not (on_kernels or sgemm)):  # fmt: skip
            return None
        a = m.arch
        first = m.layers[0].self_attn
        if first.attn.ops is None or first.attn.k_cache.dtype is not torch.float32 or first.rope.cos.dtype is not torch.float32:
            return None
        groups = []
        for g in meta.groups:
            if g.query_len != 1 and (a.head_dim % 8 or g.query_len > CHUNK_KERNEL_MAX_QUERIES):
                return None
            b = g.context_lens.shape[0]
            index = g.token_index
            if (not _i64(g.context_blocks) or not _i64(g.context_lens, b) or g.context_blocks.shape[0] != b
                    or (index is not None and not _i64(index, b * g.query_len)) or (index is None and T < b * g.query_len)):  # fmt: skip
                raise ValueError(f"decoder layers: an attention group's indexes ({b} rows of {g.query_len}) are not what the kernels read")
            groups.append((g.query_len, 0 if index is None else index.data_ptr(), g.context_blocks.data_ptr(),
                           g.context_blocks.shape[1], g.context_lens.data_ptr(), b))  # fmt: skip
        if not _i64(meta.positions, T) or not _i64(meta.slot_mapping, T):
            raise ValueError("decoder layers: positions and slot_mapping must be int64 [T], contiguous")
        layers = self._layer_args()
        segments, seg_ptr, max_slot = 0, 0, -1
        if lora is not None:
            table = lora.kernel_segments()
            if table is None or any(s is not None and (s.kernel_table is None or s.rescaled) for s in self._slots):
                return None
            segments, seg_ptr = table.args
            max_slot = table.max_slot
        D, inter, HD = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim
        nqkv = HD + 2 * a.num_kv_heads * a.head_dim
        hn, qkv, attn, o = x.new_empty(T, D), x.new_empty(T, nqkv), x.new_empty(T, HD), x.new_empty(T, D)
        gu, act, down = x.new_empty(T, 2 * inter), x.new_empty(T, inter), x.new_empty(T, D)
        rope = first.rope  # cos, sin [max_len, head_dim] float32, checked with the layers
        step = np.array([T, D, a.num_heads, a.num_kv_heads, a.head_dim, inter, x.data_ptr(), hn.data_ptr(), qkv.data_ptr(),
                         attn.data_ptr(), o.data_ptr(), gu.data_ptr(), act.data_ptr(), down.data_ptr(),
                         meta.positions.data_ptr(), rope.cos.data_ptr(), rope.sin.data_ptr(),
                         meta.slot_mapping.data_ptr(), meta.block_size, segments, seg_ptr, max_slot, sgemm], dtype=np.int64)  # fmt: skip
        group_array = np.array(groups, dtype=np.int64).reshape(-1, 6)
        rc = self._run(len(m.layers), layers.ctypes.data, step.ctypes.data, len(groups), group_array.ctypes.data,
                       a.rms_norm_eps, a.head_dim**-0.5, torch.get_num_threads())  # fmt: skip
        if rc != 0:
            raise ValueError(f"decoder layers: the LoRA segments name slot {max_slot}, past a projection's slot table")
        self.calls += 1
        return down
