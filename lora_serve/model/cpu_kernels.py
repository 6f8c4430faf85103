"""The small-batch CPU kernels of cpu_kernels.c, built once with the machine's C compiler and called through ctypes.

Optional by design: without a C compiler, on a CPU without AVX2/FMA/F16C, or when the build fails,
`cpu_kernels()` returns None with the reason; the resolve step (engine/resolve.py) then keeps torch's
matmuls and float32 adapters, and logs why.
The library goes to <cache>/kernels/ under a name made of the hash of the source and the flags,
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
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .default_model import cache_root

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FEATURES = ("avx2", "fma", "f16c")
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class CPUKernels:
    """The kernels, on CPU torch tensors; every one accumulates in float32."""

    def __init__(self, lib: ctypes.CDLL):
        self._linear = lib.linear_f32
        self._linear.argtypes = [_P, _L, _P, _P, _L, _L, _L, _L, _I]
        self._linear.restype = None
        self._shrink = lib.lora_shrink_seg_f16
        self._shrink.argtypes = [_P, _L, _L, _L, _P, _P, _P, _P, _P, _P, _L, _L, _I]
        self._shrink.restype = None
        self._expand = lib.lora_expand_seg_f16
        self._expand.argtypes = [_P, _L, _P, _L, _L, _P, _P, _P, _P, _P, _P, _P, _L, _I]
        self._expand.restype = None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear for float32: x [M, K] with unit column stride, weight [N, K] contiguous -> [M, N]."""
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
        self._linear(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y if bias is None else y.add_(bias)

    def lora_shrink(self, x: torch.Tensor, out: torch.Tensor, tasks: ShrinkTasks) -> None:
        """out[t, :R] = scale·(x[t]·Aᵀ) for the rows t of each segment, with that segment's adapter.
        x: [T, K] and out: [T, >= tasks.max_r], float32 with unit column strides."""
        t, k = x.shape
        if x.dtype != torch.float32 or x.stride(1) != 1 or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"lora_shrink: x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} {out.dtype}")
        if out.shape[0] != t or out.shape[1] < tasks.max_r or tasks.k != k or tasks.max_row > t:
            raise ValueError(f"lora_shrink: segments for K={tasks.k} up to row {tasks.max_row}, rank {tasks.max_r}; x {tuple(x.shape)}")
        self._shrink(x.data_ptr(), x.stride(0), k, *tasks.args, out.data_ptr(), out.stride(0), tasks.max_r, torch.get_num_threads())

    def lora_expand(self, h: torch.Tensor, y: torch.Tensor, tasks: ExpandTasks) -> None:
        """y[t, slice] += h[t, cols]·Bᵀ per task (segment, output slice), in place. h: [T, >= the tasks'
        columns] (lora_shrink's out) and y: [T, out], float32 with unit column strides."""
        if h.dtype != torch.float32 or h.stride(1) != 1 or y.dtype != torch.float32 or y.stride(1) != 1:
            raise ValueError(f"lora_expand: h {tuple(h.shape)} {h.dtype}, y {tuple(y.shape)} {y.dtype}")
        if tasks.max_row > min(h.shape[0], y.shape[0]) or tasks.h_cols > h.shape[1] or tasks.y_cols > y.shape[1]:
            raise ValueError(
                f"lora_expand: tasks reach row {tasks.max_row}, columns {tasks.h_cols}/{tasks.y_cols}; h {tuple(h.shape)}, y {tuple(y.shape)}"
            )
        self._expand(h.data_ptr(), h.stride(0), y.data_ptr(), y.stride(0), *tasks.args, tasks.max_blocks, torch.get_num_threads())


OUT_BLOCK = 64  # cpu_kernels.c's outputs per expand task


class ShrinkTasks:
    """The shrink's table, one entry per segment: rows [lo, hi) and its adapter's A (float16 [R, K],
    contiguous) and column scales (float32 [R]), by address. Holds those tensors, so the addresses stay valid."""

    def __init__(self, rows: list[tuple[int, int]], A: list[torch.Tensor], scales: list[torch.Tensor], k: int):
        for a, sc in zip(A, scales):
            if a.dtype != torch.float16 or not a.is_contiguous() or a.shape[1] != k or sc.dtype != torch.float32 or not sc.is_contiguous():
                raise ValueError(f"ShrinkTasks: A {tuple(a.shape)} {a.dtype}, scales {tuple(sc.shape)} {sc.dtype}, K={k}")
        self.k = k
        self.keep = [*A, *scales]
        ranks = [a.shape[0] for a in A]
        self.max_r = max(ranks, default=0)
        self.max_row = max((hi for _, hi in rows), default=0)
        lo, hi, a_ptr, r, s_ptr = (
            _array(c) for c in ([lo for lo, _ in rows], [hi for _, hi in rows], _addresses(A), ranks, _addresses(scales))
        )
        self._arrays = (lo, hi, a_ptr, r, s_ptr)
        self.args = (len(rows), *(a.ctypes.data for a in self._arrays))  # S, lo, hi, A, R, scale


class ExpandTasks:
    """The expand's table, one entry per (segment, output slice): rows [lo, hi), the slice's columns of h
    [hcol, hcol + r), its B ([O, r] viewing float16 [r, O] memory, the CPU kernels' layout:
    LoRAModel.packed's b_transposed) by address, and its output columns [ycol, ycol + O)."""

    def __init__(self, tasks: list[tuple[int, int, int, torch.Tensor, int]]):
        """tasks: (lo, hi, hcol, B, ycol) each."""
        for *_, b, _ in tasks:
            if b.dtype != torch.float16 or b.dim() != 2 or not b.t().is_contiguous():
                raise ValueError(f"ExpandTasks: B {tuple(b.shape)} {b.dtype} with strides {b.stride()}: [O, r] over [r, O] memory is read")
        self.keep = [b for *_, b, _ in tasks]
        r = [b.shape[1] for b in self.keep]
        o = [b.shape[0] for b in self.keep]
        self.max_row = max((hi for _, hi, *_ in tasks), default=0)
        self.h_cols = max((hcol + w for (_, _, hcol, _, _), w in zip(tasks, r)), default=0)
        self.y_cols = max((ycol + w for (*_, ycol), w in zip(tasks, o)), default=0)
        self.max_blocks = (max(o, default=0) + OUT_BLOCK - 1) // OUT_BLOCK
        columns = ([t[0] for t in tasks], [t[1] for t in tasks], [t[2] for t in tasks], r, _addresses(self.keep), [t[4] for t in tasks], o)
        self._arrays = tuple(_array(c) for c in columns)
        self.args = (len(tasks), *(a.ctypes.data for a in self._arrays))  # n, lo, hi, hcol, r, B, ycol, O


def _addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _array(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


_lock = threading.Lock()


@cache
def _load() -> tuple[CPUKernels | None, str]:
    missing = _missing_cpu_features()
    if missing:
        return None, missing
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"lora_cpu_{key}.so"
    try:
        if not target.exists():  # built before (or into an image, deploy/Dockerfile): no compiler needed
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if compiler is None:
                return None, "no C compiler (cc or gcc) on PATH"
            _build(compiler, target)
        return CPUKernels(ctypes.CDLL(str(target))), ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {SOURCE.name} failed: {str(exc).strip()[:300]}"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
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
