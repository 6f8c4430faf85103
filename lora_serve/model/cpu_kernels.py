"""The small-batch CPU kernels of cpu_kernels.c, built once with the machine's C compiler and called through ctypes.

One library from three sources and their shared header: the matmul kernels here, and a layer's
non-matmul work (cpu_layer_ops.c and cpu_attention.c, wrapped by cpu_layer_ops.py as `CPUKernels.layer_ops`).

Optional by design: without a C compiler, on a CPU without AVX2/FMA/F16C, or when the build fails,
`cpu_kernels()` returns None with the reason; the resolve step (engine/resolve.py) then keeps torch's
matmuls and float32 adapters, and logs why.
The library goes to <cache>/kernels/ under a name made of the hash of the sources, the header and the flags,
written to a temporary file and renamed, so concurrent processes build at most once each and never
load a half-written file; a library already there is loaded without a compiler (a container image
builds it at image build time). ctypes rather than a torch extension: no torch headers, no ninja, and a
build of under a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .cpu_layer_ops import CPULayerOps
from .default_model import cache_root

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.c", "cpu_layer_ops.c", "cpu_attention.c", "cpu_layers.c")]
HEADERS = [Path(__file__).with_name("cpu_simd.h")]  # included by the first three: part of what a build is
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FEATURES = ("avx2", "fma", "f16c")
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class CPUKernels:
    """The kernels, on CPU torch tensors; every one accumulates in float32."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib  # the library itself: cpu_layers.py binds its decoder_layers
        self._linear = lib.linear_f32
        self._linear.argtypes = [_P, _L, _P, _P, _L, _L, _L, _L, _I]
        self._linear.restype = None
        self._linear_avx2 = lib.linear_f32_avx2  # the AVX2 path even where AVX-512 is there (linear's `isa`)
        self._linear_avx2.argtypes = self._linear.argtypes
        self._linear_avx2.restype = None
        self._linear_q8 = lib.linear_q8
        self._linear_q8.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, _I]
        self._linear_q8.restype = None
        self._linear_q8_avx2 = lib.linear_q8_avx2  # linear_q8's `isa` "avx2" (the same bits)
        self._linear_q8_avx2.argtypes = self._linear_q8.argtypes
        self._linear_q8_avx2.restype = None
        self._linear_q4 = lib.linear_q4
        self._linear_q4.argtypes = [_P, _L, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I]
        self._linear_q4.restype = None
        self._linear_q4_avx2 = lib.linear_q4_avx2  # linear_q4's `isa` "avx2" (the same bits)
        self._linear_q4_avx2.argtypes = self._linear_q4.argtypes
        self._linear_q4_avx2.restype = None
        self._lora = lib.lora_seg_f16
        self._lora.argtypes = [_P, _L, _L, _P, _L, _P, _L, _L, _P, _P, _P, _L, _L, _I]
        self._lora.restype = None
        self._lora_avx2 = lib.lora_seg_f16_avx2  # the AVX2 tiles even where AVX-512 is there (the same bits; lora's `isa`)
        self._lora_avx2.argtypes = self._lora.argtypes
        self._lora_avx2.restype = None
        self.layer_ops = CPULayerOps(lib)  # the same library's non-matmul work of a layer

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
        """F.linear for float32: x [M, K] with unit column stride, weight [N, K] contiguous -> [M, N].
        isa "avx2": the AVX2 path even on a CPU with AVX-512 ("auto" takes AVX-512 where there is one)."""
        m, k = x.shape
        n = weight.shape[0]
        if (
            weight.shape != (n, k)
            or x.stride(1) != 1
            or not weight.is_contiguous()
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
        ):
            raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
        y = torch.empty(m, n, dtype=torch.float32)
        run = self._linear_avx2 if isa == "avx2" else self._linear
        run(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y if bias is None else y.add_(bias)

    def linear_q8(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, isa: str = "auto") -> torch.Tensor:
        """x·(scales[:, None]·q)ᵀ: x float32 [M, K] with unit column stride, q int8 [N, K] and scales float32
        [N], contiguous -> [M, N] float32. isa "avx2": the AVX2 path even on a CPU with AVX-512 (both give
        the same bits)."""
        m, k = x.shape
        n = q.shape[0]
        if q.shape != (n, k) or q.dtype != torch.int8 or scales.shape != (n,) or scales.dtype != torch.float32:
            raise ValueError(f"linear_q8: x {tuple(x.shape)}, q {tuple(q.shape)} {q.dtype}, scales {tuple(scales.shape)} {scales.dtype}")
        _check_quantized_operands(x, q, scales)
        y = torch.empty(m, n, dtype=torch.float32)
        run = self._linear_q8_avx2 if isa == "avx2" else self._linear_q8
        run(x.data_ptr(), x.stride(0), q.data_ptr(), scales.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y

    def linear_q4(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  isa: str = "auto") -> torch.Tensor:  # fmt: skip
        """x·Wᵀ for W 4-bit in groups of G = K / scales.shape[1] along K (cpu_kernels.c: linear_q4): x float32
        [M, K] with unit column stride, packed uint8 [N, K / 2], scales and mins float32 [N, K / G],
        contiguous -> [M, N] float32. isa "avx2": the AVX2 path even on a CPU with AVX-512 (the same bits)."""
        m, k = x.shape
        n, groups = scales.shape
        if (packed.shape != (n, k // 2) or packed.dtype != torch.uint8 or mins.shape != scales.shape or k % groups
                or (k // groups) % 32 or scales.dtype != torch.float32 or mins.dtype != torch.float32):  # fmt: skip
            raise ValueError(f"linear_q4: x {tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype}, scales {tuple(scales.shape)}")
        _check_quantized_operands(x, packed, scales, mins)
        xsum = x.reshape(m, groups, k // groups).sum(-1).contiguous()  # [M, K / G]: what each group's minimum multiplies
        y = torch.empty(m, n, dtype=torch.float32)
        run = self._linear_q4_avx2 if isa == "avx2" else self._linear_q4
        run(x.data_ptr(), x.stride(0), packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), xsum.data_ptr(),
            y.data_ptr(), n, m, n, k, k // groups, torch.get_num_threads())  # fmt: skip
        return y

    def lora(self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, segments: SegmentTable, table: SlotTable,
             isa: str = "auto") -> None:  # fmt: skip
        """y[t] += scale·(x[t]·Aᵀ)·Bᵀ for the rows t of each segment, with its slot's adapter in `table`, in
        place; h[t, :R] receives the scaled x[t]·Aᵀ. x: [T, K], h: [T, >= table.max_r], y: [T, out], all
        float32 with unit column strides. isa "avx2": the AVX2 tiles even on a CPU with AVX-512 (both
        give the same bits)."""
        t, k = x.shape
        if any(v.dtype != torch.float32 or v.stride(1) != 1 for v in (x, h, y)):
            raise ValueError(f"lora: x {tuple(x.shape)} {x.dtype}, h {tuple(h.shape)} {h.dtype}, y {tuple(y.shape)} {y.dtype}")
        if h.shape[0] != t or y.shape[0] != t or h.shape[1] < table.max_r or y.shape[1] < table.y_cols or table.k != k:
            raise ValueError(
                f"lora: slots for K={table.k}, rank {table.max_r}, {table.y_cols} outputs; x {tuple(x.shape)}, h {tuple(h.shape)}, y {tuple(y.shape)}"
            )
        if segments.max_row > t or segments.max_slot >= table.num_slots:
            raise ValueError(f"lora: segments reach row {segments.max_row} and slot {segments.max_slot}; {t} rows, {table.num_slots} slots")
        run = self._lora_avx2 if isa == "avx2" else self._lora
        run(x.data_ptr(), x.stride(0), k, h.data_ptr(), h.stride(0), y.data_ptr(), y.stride(0),
            *segments.args, *table.args, torch.get_num_threads())  # fmt: skip


def _check_quantized_operands(x: torch.Tensor, *weights: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"quantized linear: x must be float32 on CPU with unit column stride, not {x.dtype} {x.stride()}")
    if not all(w.is_contiguous() and w.device.type == "cpu" for w in weights):
        raise ValueError("quantized linear: the weights must be contiguous CPU tensors")


OUT_BLOCK = 64  # cpu_kernels.c's outputs per expand block


class SegmentTable:
    """A pass's segments (slot, lo, hi) as the kernels read them; built once per step, read by every projection."""

    def __init__(self, segments: list[tuple[int, int, int]]):
        self._seg = np.array(segments, dtype=np.int64).reshape(-1, 3)
        self.max_row = max((hi for _, _, hi in segments), default=0)
        self.max_slot = max((slot for slot, _, _ in segments), default=-1)
        if any(slot < 0 or not 0 <= lo <= hi for slot, lo, hi in segments):
            raise ValueError(f"SegmentTable: segments {segments}")
        self.args = (len(segments), self._seg.ctypes.data)


@dataclass(frozen=True, eq=False)
class SlotRows:
    """One adapter's rows in one projection's SlotTable (`SlotTable.rows`), built once, on any thread:
    making the adapter resident then copies them in (`SlotTable.put`)."""

    info: tuple[int, int, int]  # the address of its A, R, the address of its column scales
    blocks: np.ndarray  # [n, 6] int64 expand blocks: hcol, r, B address, ldb, ycol, width
    y_cols: int  # the outputs its blocks reach
    keep: tuple  # the tensors whose addresses it holds: A, scales and every B


class SlotTable:
    """One projection's resident adapters by slot, as the kernels read them: per slot, the address of its A
    (float16 [R, K], contiguous), R and the address of its column scales (float32 [R]); per 64 outputs of
    each targeted slice, an expand block (the slice's B, float16 [r, O] memory, at the block's first
    output). Kept in step with the slots (lora/slots.py puts an entry's rows on every fill and clear),
    so a step builds no table: it hands the kernels its segments. Holds the tensors whose addresses it stores."""

    def __init__(self, k: int):
        self.k = k
        self._info = np.zeros((0, 5), dtype=np.int64)  # per slot: A address (0: none), R, scales address, first block, count
        self._blocks = np.zeros((0, 6), dtype=np.int64)  # hcol, r, B address, ldb, ycol, width
        self._num_blocks = 0  # rows of _blocks in use (those of cleared slots included, until compacted)
        self._live_blocks = 0  # of those, the rows the slots hold now
        self._keep: list[SlotRows | None] = []  # per slot: its rows
        self.max_r = self.y_cols = self.max_blocks = 0  # upper bounds over every slot set so far
        self.args: tuple[int, ...] = ()
        # The same, and the slot count, where C reads them when it is called (cpu_layers.c): the array stays, its values follow the sets.
        self.arg_array = np.zeros(5, dtype=np.int64)
        self._update_args()

    @property
    def num_slots(self) -> int:
        return len(self._keep)

    def rows(self, A: torch.Tensor, scales: torch.Tensor, slices: Sequence[tuple[int, torch.Tensor, int]] = ()) -> SlotRows:
        """An adapter's rows for this table. slices: per targeted slice, (first column of x·Aᵀ, B [O, r]
        viewing float16 [r, O] memory, first output column). Reads only `k`: any thread may call it."""
        if A.dtype != torch.float16 or not A.is_contiguous() or A.dim() != 2 or A.shape[1] != self.k:
            raise ValueError(f"SlotTable: A {tuple(A.shape)} {A.dtype}, K={self.k}")
        if scales.dtype != torch.float32 or not scales.is_contiguous() or scales.numel() != A.shape[0]:
            raise ValueError(f"SlotTable: scales {tuple(scales.shape)} {scales.dtype} for rank {A.shape[0]}")
        blocks, y_cols = [], 0
        for hcol, b, ycol in slices:
            if b.dtype != torch.float16 or b.dim() != 2 or not b.t().is_contiguous() or hcol + b.shape[1] > A.shape[0]:
                raise ValueError(f"SlotTable: B {tuple(b.shape)} {b.dtype}, strides {b.stride()}: [O, r] over [r, O] memory is read")
            o, r = b.shape
            for o0 in range(0, o, OUT_BLOCK):
                blocks.append((hcol, r, b.data_ptr() + 2 * o0, o, ycol + o0, min(OUT_BLOCK, o - o0)))  # 2: bytes per float16
            y_cols = max(y_cols, ycol + o)
        array = np.array(blocks, dtype=np.int64).reshape(-1, 6)
        return SlotRows((A.data_ptr(), A.shape[0], scales.data_ptr()), array, y_cols, (A, scales, *(b for _, b, _ in slices)))

    def set(self, slot: int, A: torch.Tensor | None, scales: torch.Tensor | None = None,
            slices: Sequence[tuple[int, torch.Tensor, int]] = ()) -> None:  # fmt: skip
        """Point `slot` at an adapter (A None: none, or it does not target this projection); see `rows`."""
        if A is None:
            self.put(slot, None)
        else:
            assert scales is not None
            self.put(slot, self.rows(A, scales, slices))

    def put(self, slot: int, rows: SlotRows | None) -> None:
        """Point `slot` at an adapter's rows (None: none)."""
        while len(self._keep) <= slot:
            self._keep.append(None)
        if len(self._info) < len(self._keep):
            self._info = np.concatenate([self._info, np.zeros((len(self._keep) * 2 - len(self._info), 5), dtype=np.int64)])
        self._keep[slot] = rows
        self._live_blocks -= int(self._info[slot, 4])
        self._info[slot] = 0
        if rows is not None:
            self._info[slot, :3] = rows.info
            self._info[slot, 3:] = self._add_blocks(rows)
            self._live_blocks += len(rows.blocks)
            self.max_r = max(self.max_r, rows.info[1])
            self.y_cols = max(self.y_cols, rows.y_cols)
        if self._num_blocks > 2 * self._live_blocks + 1024:
            self._compact()
        self._update_args()

    def _add_blocks(self, rows: SlotRows) -> tuple[int, int]:
        first, count = self._num_blocks, len(rows.blocks)
        need = first + count
        if need > len(self._blocks):
            grown = np.zeros((max(need, 2 * len(self._blocks)), 6), dtype=np.int64)
            grown[:first] = self._blocks[:first]
            self._blocks = grown
        self._blocks[first:need] = rows.blocks
        self._num_blocks = need
        self.max_blocks = max(self.max_blocks, count)
        return first, count

    def _compact(self) -> None:
        """Drop the blocks of cleared and re-set slots: rebuild from what each slot holds."""
        self._num_blocks = 0
        for slot, rows in enumerate(self._keep):
            if rows is not None:
                self._info[slot, 3:] = self._add_blocks(rows)

    def _update_args(self) -> None:
        self.args = (self._info.ctypes.data, self._blocks.ctypes.data, self.max_r, self.max_blocks)
        self.arg_array[:] = (*self.args, self.num_slots)


_lock = threading.Lock()


def build_key() -> str:
    """Names one build of the kernels: the hash of their sources, header and compiler flags."""
    return hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(FLAGS).encode()).hexdigest()[:16]


@cache
def _load() -> tuple[CPUKernels | None, str]:
    missing = _missing_cpu_features()
    if missing:
        return None, missing
    target = cache_root() / "kernels" / f"lora_cpu_{build_key()}.so"
    try:
        if not target.exists():  # built before (or into an image, deploy/Dockerfile): no compiler needed
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if compiler is None:
                return None, "no C compiler (cc or gcc) on PATH"
            _build(compiler, target)
        return CPUKernels(ctypes.CDLL(str(target))), ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {', '.join(s.name for s in SOURCES)} failed: {str(exc).strip()[:300]}"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(done.stderr or f"{compiler} exited with {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _missing_cpu_features() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return "no /proc/cpuinfo to read the CPU's features from"
    missing = [f for f in CPU_FEATURES if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else ""


def cpu_kernels() -> tuple[CPUKernels | None, str]:
    """(the kernels, "") or (None, why they are unavailable). Built on the first call, then cached."""
    with _lock:
        return _load()
