"""A decoder layer's float32 work between its matmuls: RMSNorm with the residual add, rotary embedding with
the KV-cache write, the MLP's silu(gate) * up (cpu_layer_ops.c), and attention read in place from the
paged cache, of decodes and of prefill chunks (cpu_attention.c).

Built into the CPU kernels' library (cpu_kernels.py), so they come and go together: the model takes
these when it takes the kernels (LlamaModel.use_cpu_kernels) and its rows are float32 on the CPU;
otherwise the torch ops in llama.py, rope.py and attention.py run, as on CUDA. Results agree with those
ops to float32 rounding (tests/model/test_cpu_layer_ops.py), not bit for bit: sums run in another order.
"""

from __future__ import annotations

import ctypes

import torch

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


def _cpu_f32(*tensors: torch.Tensor) -> bool:
    # A loop, `is` and is_cpu, not a generator, == and .device.type: this runs several times a layer.
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or t.stride(-1) != 1:
            return False
    return True


class CPULayerOps:
    def __init__(self, lib: ctypes.CDLL):
        self._rms_norm = lib.rms_norm
        self._rms_norm.argtypes = [_P, _L, _P, _L, _P, _P, _L, _L, _L, _F, _I]
        self._rms_norm.restype = None
        self._rope = lib.rope_write_kv
        self._rope.argtypes = [_P, _L, _L, _P, _P, _P, _L, _L, _L, _P, _P, _P, _I]
        self._rope.restype = None
        self._silu_mul = lib.silu_mul
        self._silu_mul.argtypes = [_P, _L, _L, _L, _P, _L, _I]
        self._silu_mul.restype = None
        self._attention = lib.decode_attention
        self._attention.argtypes = [_P, _L, _P, _P, _P, _P, _L, _P, _L, _L, _L, _L, _L, _F, _P, _L, _I]
        self._attention.restype = None
        self._attention_avx2 = lib.decode_attention_avx2  # without the AVX-512 value sum even where the CPU has it (the same bits)
        self._attention_avx2.argtypes = self._attention.argtypes
        self._attention_avx2.restype = None
        self._chunk_attention = lib.chunk_attention
        self._chunk_attention.argtypes = [_P, _L, _P, _P, _P, _P, _L, _P, _L, _L, _L, _L, _L, _L, _F, _P, _L, _I]
        self._chunk_attention.restype = None
        self._chunk_attention_avx2 = lib.chunk_attention_avx2  # the 8-lane tiles even where AVX-512 is there (the same bits)
        self._chunk_attention_avx2.argtypes = self._chunk_attention.argtypes
        self._chunk_attention_avx2.restype = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] (x += add first, in place, when add [T, D] is given) -> weight * x / rms(x), [T, D]."""
        t, d = x.shape
        if not _cpu_f32(x, weight) or (add is not None and (not _cpu_f32(add) or add.shape != x.shape)) or weight.shape != (d,):
            raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
        out = torch.empty(t, d, dtype=torch.float32)
        self._rms_norm(x.data_ptr(), x.stride(0), None if add is None else add.data_ptr(), 0 if add is None else add.stride(0),
                       weight.data_ptr(), out.data_ptr(), d, t, d, eps, torch.get_num_threads())  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2N] (gate, then up) -> silu(gate) * up, [T, N]."""
        t, n2 = gate_up.shape
        if not _cpu_f32(gate_up) or n2 % 2:
            raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} {gate_up.dtype}")
        out = torch.empty(t, n2 // 2, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), t, n2 // 2, out.data_ptr(), n2 // 2, torch.get_num_threads())
        return out

    def rope_write_kv(self, qkv: torch.Tensor, heads: tuple[int, int, int], positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:  # fmt: skip
        """Rotate q's heads of qkv [T, (H + 2 KV) D] in place, and write the rotated k and the v of each token
        t into k_cache / v_cache [num_slots, KV, D] at slots[t]. heads: (H, KV, D); cos, sin [max_len, D]."""
        h, kv, d = heads
        t = qkv.shape[0]
        if (not _cpu_f32(qkv, cos, sin) or not k_cache.is_contiguous() or not v_cache.is_contiguous() or not cos.is_contiguous()
                or not sin.is_contiguous() or not _cpu_f32(k_cache, v_cache) or qkv.shape[1] != (h + 2 * kv) * d
                or k_cache.shape[1:] != (kv, d) or v_cache.shape != k_cache.shape or cos.shape[1] != d or d % 2
                or positions.dtype != torch.int64 or slots.dtype != torch.int64 or positions.shape != (t,) or slots.shape != (t,)
                or not positions.is_contiguous() or not slots.is_contiguous()):  # fmt: skip
            raise ValueError(
                f"rope_write_kv: qkv {tuple(qkv.shape)} {qkv.dtype}, heads {heads}, cache {tuple(k_cache.shape)} {k_cache.dtype}"
            )
        self._rope(qkv.data_ptr(), qkv.stride(0), t, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), h, kv, d,
                   slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads())  # fmt: skip

    def decode_attention(self, q: torch.Tensor, out: torch.Tensor, token_index: torch.Tensor | None, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, blocks: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                         isa: str = "auto") -> None:  # fmt: skip
        """For each row b, one query token t = token_index[b] (None: b): out[t] = attention of q[t] over the
        row's context_lens[b] keys in the cache blocks blocks[b] (which must hold that many: the
        attention groups' invariant, attention_groups.py). q [T, H * D] and out [T, H * D] rows of any
        stride; caches [num_slots, KV, D]; blocks [B, n] and context_lens [B] int64. isa "avx2": without
        the AVX-512 value sum even on a CPU with AVX-512 (both give the same bits)."""
        h, kv, d, b = self._check_attention("decode_attention", q, out, token_index, k_cache, v_cache, blocks, context_lens, 1)
        run = self._attention_avx2 if isa == "avx2" else self._attention
        run(q.data_ptr(), q.stride(0), None if token_index is None else token_index.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), blocks.data_ptr(), blocks.shape[1], context_lens.data_ptr(), b, h, kv, d, block_size, d**-0.5,
            out.data_ptr(), out.stride(0), torch.get_num_threads())  # fmt: skip

    def chunk_attention(self, q: torch.Tensor, out: torch.Tensor, token_index: torch.Tensor | None, query_len: int,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, context_lens: torch.Tensor,
                        block_size: int, isa: str = "auto") -> None:  # fmt: skip
        """decode_attention for rows of Q = query_len tokens each (prefill chunks, the last Q tokens of their
        contexts): row b's tokens t = token_index[b * Q + i] (None: b * Q + i), query i sees keys
        0..context_lens[b] - Q + i (causal). The head size must be a multiple of 8. isa "avx2": the 8-lane
        tiles even on a CPU with AVX-512 (both give the same bits)."""
        h, kv, d, b = self._check_attention("chunk_attention", q, out, token_index, k_cache, v_cache, blocks, context_lens, query_len)
        if d % 8 or query_len < 1 or (b and int(context_lens.min()) < query_len):
            raise ValueError(f"chunk_attention: head size {d}, {query_len} queries a row, context lengths {context_lens.tolist()}")
        run = self._chunk_attention_avx2 if isa == "avx2" else self._chunk_attention
        run(q.data_ptr(), q.stride(0), None if token_index is None else token_index.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), blocks.data_ptr(), blocks.shape[1], context_lens.data_ptr(), b, query_len, h, kv, d, block_size,
            d**-0.5, out.data_ptr(), out.stride(0), torch.get_num_threads())  # fmt: skip

    @staticmethod
    def _check_attention(name: str, q: torch.Tensor, out: torch.Tensor, token_index: torch.Tensor | None, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, blocks: torch.Tensor, context_lens: torch.Tensor, query_len: int) -> tuple[int, int, int, int]:  # fmt: skip
        """(H, KV, D, B) of an attention call, or a ValueError for operands the C code would misread."""
        _, kv, d = k_cache.shape
        h = q.shape[1] // d
        b = context_lens.shape[0]
        if (not _cpu_f32(q, out, k_cache, v_cache) or not k_cache.is_contiguous() or not v_cache.is_contiguous()
                or out.shape[1] != q.shape[1] or h % kv or blocks.dtype != torch.int64 or context_lens.dtype != torch.int64
                or not blocks.is_contiguous() or not context_lens.is_contiguous() or blocks.shape[0] != b
                or (token_index is not None and (token_index.dtype != torch.int64 or token_index.shape != (b * query_len,)
                                                 or not token_index.is_contiguous()))
                or (token_index is None and (q.shape[0] < b * query_len or out.shape[0] < b * query_len))):  # fmt: skip
            raise ValueError(f"{name}: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, blocks {tuple(blocks.shape)}, {b} rows")
        return h, kv, d, b
