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
        self._shrink = lib.lora_shrink_f16
        self._shrink.argtypes = [_P, _L, _P, _P, _L, _L, _L, _L, _I]
        self._shrink.restype = None
        self._expand = lib.lora_expand_f16
        self._expand.argtypes = [_P, _L, _P, _P, _L, _L, _L, _L, _L, _I]
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

    def shrink(self, x: torch.Tensor, A: torch.Tensor, m: int) -> torch.Tensor:
        """x: [G * m, K] float32 with unit column stride; A: [G, R, K] (or [R, K] for G = 1) float16,
        contiguous. Returns x·Aᵀ per group: [G * m, R] float32."""
        A3 = A if A.dim() == 3 else A.unsqueeze(0)
        g, r, k = A3.shape
        if x.shape != (g * m, k) or x.stride(1) != 1 or x.dtype != torch.float32 or A3.dtype != torch.float16 or not A3.is_contiguous():
            raise ValueError(f"shrink: x {tuple(x.shape)} {x.dtype}, A {tuple(A3.shape)} {A3.dtype}, m={m}")
        out = torch.empty(g * m, r, dtype=torch.float32)
        self._shrink(x.data_ptr(), x.stride(0), A3.data_ptr(), out.data_ptr(), g, m, k, r, torch.get_num_threads())
        return out

    def expand_add(self, h: torch.Tensor, B: torch.Tensor, y: torch.Tensor, m: int) -> None:
        """y += h·Bᵀ per group, in place. h: [G * m, r] float32, B: [G, O, r] (or [O, r]) float16 contiguous,
        y: [G * m, O] float32; h and y with unit column stride (views of wider tensors are fine)."""
        B3 = B if B.dim() == 3 else B.unsqueeze(0)
        g, o, r = B3.shape
        ok = h.shape == (g * m, r) and y.shape == (g * m, o) and h.stride(1) == 1 and y.stride(1) == 1
        if not ok or h.dtype != torch.float32 or y.dtype != torch.float32 or B3.dtype != torch.float16 or not B3.is_contiguous():
            raise ValueError(f"expand: h {tuple(h.shape)} {h.dtype}, B {tuple(B3.shape)} {B3.dtype}, y {tuple(y.shape)} {y.dtype}, m={m}")
        self._expand(h.data_ptr(), h.stride(0), B3.data_ptr(), y.data_ptr(), y.stride(0), g, m, o, r, torch.get_num_threads())


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
