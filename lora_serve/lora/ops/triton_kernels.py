"""Fused mixed-adapter LoRA kernels in Triton: one shrink and one expand launch per projection.

    shrink:  buf[k, t, A-row j]  = x[t] · A[slot(t)][j]ᵀ                 (float32, partial sum k of SPLIT_K)
    expand:  y[t, slice s]      += scale · Σ_k buf[k, t, rows of s] · B_s[slot(t)]ᵀ

Each adapter's A [R, in] and B_s [out_s, r_s] are its own tensors at their exact ranks (lora/slots.py);
the kernels find them through a table of addresses per slot (as vLLM's lora_ptr_tensor) and read
nothing of max_lora_rank.
A and B may be float32, bfloat16 or float16 (LoRAConfig.lora_dtype), whatever x and y are: each
tile is converted to the dot's input dtype (x's in the shrink, y's in the expand; float32 dots run
in IEEE precision) and accumulated in float32.

Both cover every segment (rows sharing an adapter, Punica's SGMV) and every slice of a fused
projection (q/k/v, gate/up) in one launch. Grid: (row blocks of the longest segment x [split-K |
output blocks], slices x [rank blocks], segments). A program whose rows lie past its segment's
end, or whose slice the adapter does not target, or whose rank block lies past the adapter's own
rank, returns at once; the expand loops over rank blocks only up to the adapter's rank (S-LoRA's
MBGMV), so mixed ranks cost what each adapter needs, never max_rank. Rows in no segment are never
touched. Split-K partial sums go to separate buffer planes and are added in a fixed order by the
expand, so results do not depend on scheduling (no atomics).

The kernels are wrapped with `triton.jit` on first use, once per interpreter mode: triton picks the
interpreter (TRITON_INTERPRET=1, CPU tensors) when a function is wrapped, not when it is called. They
call triton builtins only (tl.full, not tl.zeros or tl.cdiv): triton's own jit helpers are wrapped when
triton is imported, so an interpreter switched on after that could not run them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .interpreter import triton_interpreted

BLOCK_K = 64  # reduction tile of the shrink (input features)
BLOCK_R = 16  # rank tile: tl.dot's smallest; a rank-r adapter runs ceil(r / 16) of them
BLOCK_N = 64  # output tile of the expand for prefill-sized segments (block_n)
BLOCK_N_DECODE = 256  # and for decode-sized ones
MAX_SLICES = 3  # q/k/v; the kernels take one B pointer per slice


@dataclass
class KernelTables:
    """What the kernels read of one projection's slots (built by triton_ops.kernel_tables), rebuilt when its entries
    change (slots.version)."""

    ptrs: torch.Tensor  # int64 [slots, 1 + MAX_SLICES]: packed A's address, then each slice's B's (0: none)
    meta: torch.Tensor  # int32 [slots, 2, n]: each slice's rank (0: not targeted), its first column of x·Aᵀ
    scales: torch.Tensor  # float32 [slots, n]
    ref: torch.Tensor  # any tensor of the slots' dtype: the kernels take their element type from it
    max_rank: int  # largest rank of any slice
    width: int  # largest R (the columns of x·Aᵀ) of any entry
    version: int


def _shrink_kernel(
    x_ptr, a_ref, buf_ptr, seg_ptr, meta_ptr, ptr_ptr,
    num_segs, K, rank_blocks, stride_xm, stride_xk, stride_bk, stride_bm,
    NUM_SLICES: tl.constexpr, PTRS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    # seg_ptr: int32 [3, num_segs] (slot, first row, rows); meta_ptr: int32 [slots, 2, NUM_SLICES] (rank,
    # first row of the slice in the adapter's packed A = its first column of x·Aᵀ); ptr_ptr: int64
    # [slots, PTRS = 1 + MAX_SLICES], [:, 0] the address of the adapter's packed A [R, K] (contiguous).
    pid_m = tl.program_id(0) // SPLIT_K
    pid_k = tl.program_id(0) % SPLIT_K
    s = tl.program_id(1) // rank_blocks
    r0 = (tl.program_id(1) % rank_blocks) * BLOCK_R
    g = tl.program_id(2)
    slot = tl.load(seg_ptr + g)
    start = tl.load(seg_ptr + num_segs + g)
    rows = tl.load(seg_ptr + 2 * num_segs + g)
    rank = tl.load(meta_ptr + slot * 2 * NUM_SLICES + s)
    if pid_m * BLOCK_M >= rows or r0 >= rank:
        return
    a_row = tl.load(meta_ptr + slot * 2 * NUM_SLICES + NUM_SLICES + s) + r0
    a_ptr = tl.load(ptr_ptr + slot * PTRS).to(tl.pointer_type(a_ref.dtype.element_ty))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < rows
    mask_r = r0 + offs_r < rank
    x_rows = x_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    a_rows = a_ptr + (a_row + offs_r).to(tl.int64)[None, :] * K  # [1, BLOCK_R]
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, (K + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K)):
        offs_k = (k0 * SPLIT_K + pid_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ak = tl.load(a_rows + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        if FP32:
            acc += tl.dot(xk, ak.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xk, ak.to(xk.dtype))
    out = buf_ptr + pid_k * stride_bk + (start + offs_m).to(tl.int64)[:, None] * stride_bm + (a_row + offs_r)[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


def _expand_kernel(
    buf_ptr, b_ref, y_ptr, seg_ptr, meta_ptr, ptr_ptr, scale_ptr,
    num_segs, out0, out1, out2, size0, size1, size2, n_blocks,
    stride_bk, stride_bm, stride_ym, stride_yn,
    NUM_SLICES: tl.constexpr, PTRS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    # ptr_ptr[slot, 1 + s]: the address of slice s's B [size_s, rank] (contiguous); scale_ptr: float32
    # [slots, NUM_SLICES]; y: [T, sum of size_s], slice s at column out_s
    pid_m = tl.program_id(0) // n_blocks
    n0 = (tl.program_id(0) % n_blocks) * BLOCK_N
    s = tl.program_id(1)
    g = tl.program_id(2)
    slot = tl.load(seg_ptr + g)
    start = tl.load(seg_ptr + num_segs + g)
    rows = tl.load(seg_ptr + 2 * num_segs + g)
    rank = tl.load(meta_ptr + slot * 2 * NUM_SLICES + s)
    out_col = out0
    size = size0
    if s == 1:
        out_col = out1
        size = size1
    if s == 2:
        out_col = out2
        size = size2
    if pid_m * BLOCK_M >= rows or rank == 0 or n0 >= size:
        return
    a_row = tl.load(meta_ptr + slot * 2 * NUM_SLICES + NUM_SLICES + s)
    b_ptr = tl.load(ptr_ptr + slot * PTRS + 1 + s).to(tl.pointer_type(b_ref.dtype.element_ty))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < size
    h_rows = buf_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_bm  # [BLOCK_M, 1]
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * rank  # [1, BLOCK_N]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # this adapter's rank, not max_rank
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        h_mask = mask_m[:, None] & mask_r[None, :]
        h = tl.load(h_rows + (a_row + offs_r)[None, :], mask=h_mask, other=0.0)
        for k in tl.static_range(1, SPLIT_K):
            h += tl.load(h_rows + k * stride_bk + (a_row + offs_r)[None, :], mask=h_mask, other=0.0)
        bt = tl.load(b_cols + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # Bᵀ [BLOCK_R, BLOCK_N]
        if FP32:
            acc += tl.dot(h, bt.to(tl.float32), input_precision="ieee")
        else:
            dt = y_ptr.dtype.element_ty
            acc += tl.dot(h.to(dt), bt.to(dt))
    acc = acc * tl.load(scale_ptr + slot * NUM_SLICES + s)
    y_tile = y_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_ym + (out_col + offs_n)[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@functools.cache
def _compiled(fn, interpret: bool):
    return triton.jit(fn)


def _kernel(fn):
    return _compiled(fn, triton_interpreted())


def block_m(max_rows: int) -> int:
    """Row tile: 16 (tl.dot's smallest) for decode-sized segments, larger for prefill."""
    return 16 if max_rows <= 16 else 64


def block_n(max_rows: int) -> int:
    """The expand's output tile. Decode-sized segments get wide tiles: with one row per adapter a 16 x 64 tile
    is too little work per program (Nsight Compute on an H200: the SMs busy with addresses and masks, DRAM at
    8-14% of its bandwidth; docs/benchmarks.md, GPU)."""
    return BLOCK_N_DECODE if max_rows <= 16 else BLOCK_N


def shrink(x: torch.Tensor, tables: KernelTables, segs: torch.Tensor, num_segs: int, max_rows: int,
           buf: torch.Tensor, split_k: int) -> None:  # fmt: skip
    """buf[k, t, columns of the row's adapter] = partial k of x[t]·Aᵀ. x: [T, in] (may be strided);
    tables: the projection's (lora/slots.py via triton_ops.py); segs: int32 [3, >= num_segs];
    buf: float32 [split_k, T, >= widest adapter's R], contiguous in its last dimension."""
    n = tables.meta.shape[2]
    bm = block_m(max_rows)
    rank_blocks = triton.cdiv(tables.max_rank, BLOCK_R)
    grid = (triton.cdiv(max_rows, bm) * split_k, n * rank_blocks, num_segs)
    _kernel(_shrink_kernel)[grid](
        x, tables.ref, buf, segs, tables.meta, tables.ptrs, segs.shape[1], x.shape[1], rank_blocks,
        x.stride(0), x.stride(1), buf.stride(0), buf.stride(1),
        NUM_SLICES=n, PTRS=1 + MAX_SLICES, SPLIT_K=split_k, BLOCK_M=bm, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        FP32=x.dtype == torch.float32,
    )  # fmt: skip


def expand(buf: torch.Tensor, tables: KernelTables, out_slices: list[slice], y: torch.Tensor,
           segs: torch.Tensor, num_segs: int, max_rows: int) -> None:  # fmt: skip
    """y[t, slice s] += scale · (Σ_k buf[k, t, columns of s]) · B_sᵀ of the row's adapter."""
    n = len(out_slices)
    if n > MAX_SLICES:
        raise ValueError(f"the Triton LoRA kernels take at most {MAX_SLICES} slices per projection, got {n}")
    pad = MAX_SLICES - n
    starts = [s.start for s in out_slices] + [0] * pad
    sizes = [s.stop - s.start for s in out_slices] + [0] * pad
    bm = block_m(max_rows)
    bn = block_n(max_rows)
    n_blocks = triton.cdiv(max(sizes), bn)
    grid = (triton.cdiv(max_rows, bm) * n_blocks, n, num_segs)
    _kernel(_expand_kernel)[grid](
        buf, tables.ref, y, segs, tables.meta, tables.ptrs, tables.scales, segs.shape[1], *starts, *sizes, n_blocks,
        buf.stride(0), buf.stride(1), y.stride(0), y.stride(1),
        NUM_SLICES=n, PTRS=1 + MAX_SLICES, SPLIT_K=buf.shape[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=BLOCK_R,
        FP32=y.dtype == torch.float32,
    )  # fmt: skip
