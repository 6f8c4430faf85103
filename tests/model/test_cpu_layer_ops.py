"""The CPU layer ops (model/cpu_layer_ops.c) against float64 references built from torch's own ops."""

from __future__ import annotations

import pytest
import torch

from lora_serve.model.arch import ModelArch
from lora_serve.model.cpu_kernels import CPUKernels
from lora_serve.model.rope import RotaryEmbedding


@pytest.fixture
def ops(kernels: CPUKernels):
    return kernels.layer_ops


@pytest.mark.parametrize("t,d", [(1, 576), (8, 576), (300, 64), (5, 20)])  # 300 x 64: the parallel branch; 20: a tail
def test_rms_norm_with_and_without_the_residual_add(ops, t, d):
    g = torch.Generator().manual_seed(t * d)
    x, add, w = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g), torch.randn(d, generator=g)

    def ref(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return (w.double() * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)).float()

    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref(x), rtol=1e-5, atol=1e-5)
    stream = x.clone()
    out = ops.rms_norm(stream, w, 1e-5, add=add)
    torch.testing.assert_close(stream, x + add, rtol=0, atol=0)  # the residual stream, updated in place
    torch.testing.assert_close(out, ref(x + add), rtol=1e-5, atol=1e-5)


def test_rms_norm_reads_strided_rows(ops):
    g = torch.Generator().manual_seed(3)
    wide, w = torch.randn(4, 100, generator=g), torch.randn(64, generator=g)
    x = wide[:, 10:74]
    want = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,n", [(1, 1536), (8, 1536), (64, 1536), (3, 13)])  # 64 x 1536: the parallel branch; 13: a tail
def test_silu_mul_of_the_fused_gate_up(ops, t, n):
    g = torch.Generator().manual_seed(t + n)
    gate_up = torch.randn(t, 2 * n, generator=g) * 6
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # past the exponential's clamps: silu saturates
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), (torch.nn.functional.silu(gate) * up).float(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 16), (6, 2, 12)])
def test_rope_write_kv_matches_the_rotary_embedding_and_fills_the_cache(ops, heads):
    H, KV, D = heads
    arch = ModelArch(architecture="llama", vocab_size=32, hidden_size=H * D, intermediate_size=8, num_layers=1, num_heads=H, num_kv_heads=KV,
                     head_dim=D, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling={}, max_position_embeddings=256,
                     tie_word_embeddings=False, attention_bias=False)  # fmt: skip
    rope = RotaryEmbedding(arch, 256, torch.device("cpu"))
    g = torch.Generator().manual_seed(H * D)
    T = 7
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g)
    positions = torch.tensor([0, 5, 6, 100, 255, 3, 17])
    slots = torch.tensor([12, 3, 0, 7, 30, 8, 1])
    k_cache, v_cache = torch.zeros(32, KV, D), torch.zeros(32, KV, D)
    q, k, v = qkv.clone().split([H * D, KV * D, KV * D], dim=-1)
    want_q, want_k = rope(positions, q.reshape(T, H, D), k.reshape(T, KV, D))

    ops.rope_write_kv(qkv, (H, KV, D), positions, rope.cos, rope.sin, slots, k_cache, v_cache)
    torch.testing.assert_close(qkv[:, : H * D], want_q.reshape(T, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[slots], want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache[slots], v.reshape(T, KV, D))
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def ref_attention(q, k_cache, v_cache, blocks, lens, block_size, H, KV, D):
    """Per row: gather its keys slot by slot, then softmax(q·kᵀ/sqrt(D))·v in float64. q [B, H*D] -> [B, H*D]."""
    out = []
    for b, L in enumerate(lens):
        slots = torch.tensor([blocks[b][j // block_size] * block_size + j % block_size for j in range(L)])
        k = k_cache[slots].double().repeat_interleave(H // KV, dim=1)  # [L, H, D]
        v = v_cache[slots].double().repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double().view(H, D), k) / D**0.5
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v).reshape(-1))
    return torch.stack(out).float()


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 16), (6, 2, 12), (8, 2, 64), (10, 2, 64)])  # G = 4, 5: past the joint sum's 4 heads
def test_decode_attention_reads_each_rows_context_where_the_cache_holds_it(ops, heads):
    H, KV, D = heads
    block_size, num_blocks = 4, 40
    g = torch.Generator().manual_seed(H + KV + D)
    k_cache, v_cache = torch.randn(num_blocks * block_size, KV, D, generator=g), torch.randn(num_blocks * block_size, KV, D, generator=g)
    lens = [1, 4, 5, 23, 60]  # a lone key, one whole block, a block and one key, longer
    tables = [torch.randperm(num_blocks - 1, generator=g)[: -(-L // block_size)].add(1).tolist() for L in lens]
    width = max(map(len, tables))
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # padded with block 0, never read
    q = torch.randn(len(lens), H * D, generator=g) * 3
    want = ref_attention(q, k_cache, v_cache, tables, lens, block_size, H, KV, D)

    out = torch.full((len(lens), H * D), float("nan"))
    ops.decode_attention(q, out, None, k_cache, v_cache, blocks, torch.tensor(lens), block_size)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    narrow = torch.full_like(out, float("nan"))
    ops.decode_attention(q, narrow, None, k_cache, v_cache, blocks, torch.tensor(lens), block_size, isa="avx2")
    assert torch.equal(narrow, out)  # the AVX-512 value sum (heads of 64) sums each output's keys in the same order

    # Rows scattered among other tokens: queries read at token_index from rows of a wider tensor, written there.
    packed = torch.randn(9, (H + 2 * KV) * D, generator=g)
    index = torch.tensor([8, 0, 3, 5, 1])
    packed[index, : H * D] = q
    out = torch.full((9, H * D), float("nan"))
    ops.decode_attention(packed[:, : H * D], out, index, k_cache, v_cache, blocks, torch.tensor(lens), block_size)
    torch.testing.assert_close(out[index], want, rtol=1e-5, atol=1e-5)
    others = torch.ones(9, dtype=torch.bool)
    others[index] = False
    assert out[others].isnan().all()  # rows of other groups are left for them


def ref_chunk_attention(q, k_cache, v_cache, blocks, lens, Q, block_size, H, KV, D):
    """Per row: its Q queries (the last Q tokens of its context) against its keys, query i causal up to key
    lens[b] - Q + i, in float64. q [B*Q, H*D] -> [B*Q, H*D]."""
    out = []
    for b, L in enumerate(lens):
        slots = torch.tensor([blocks[b][j // block_size] * block_size + j % block_size for j in range(L)])
        k = k_cache[slots].double().repeat_interleave(H // KV, dim=1)  # [L, H, D]
        v = v_cache[slots].double().repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("qhd,lhd->qhl", q[b * Q : (b + 1) * Q].double().view(Q, H, D), k) / D**0.5
        seen = torch.arange(L)[None, :] <= (L - Q + torch.arange(Q))[:, None]  # [Q, L]
        scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
        out.append(torch.einsum("qhl,lhd->qhd", scores.softmax(-1), v).reshape(Q, -1))
    return torch.cat(out).float()


# (heads, Q, context lengths): a prompt's first chunk (Q == L), contexts of one tile and of many (one row
# on 4 threads: its keys split into spans, merged after), rows whose queries go in several runs
# (Q * G > 64), one query of MHA heads.
CHUNKS = [
    ((9, 3, 64), 8, [1000]),
    ((9, 3, 64), 8, [8, 37, 300]),
    ((9, 3, 64), 16, [16, 1000]),
    ((9, 3, 64), 40, [41, 199]),
    ((4, 4, 16), 5, [5, 70, 129]),
    ((8, 1, 128), 3, [3, 64, 65]),
    ((2, 2, 8), 1, [1, 90]),
]


@pytest.mark.parametrize("heads,Q,lens", CHUNKS)
def test_chunk_attention_attends_causally_over_each_rows_context_in_place(ops, heads, Q, lens):
    H, KV, D = heads
    block_size = 16
    num_blocks = sum(-(-L // block_size) for L in lens) + 3
    g = torch.Generator().manual_seed(H * Q + D)
    k_cache, v_cache = torch.randn(num_blocks * block_size, KV, D, generator=g), torch.randn(num_blocks * block_size, KV, D, generator=g)
    order = torch.randperm(num_blocks - 1, generator=g).add(1).tolist()  # every row's blocks its own, scattered
    tables = []
    for L in lens:
        tables.append(order[: -(-L // block_size)])
        order = order[len(tables[-1]) :]
    width = max(map(len, tables))
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    B = len(lens)
    q = torch.randn(B * Q, H * D, generator=g) * 3
    want = ref_chunk_attention(q, k_cache, v_cache, tables, lens, Q, block_size, H, KV, D)

    threads = torch.get_num_threads()
    try:
        for n in (1, 4):  # one thread: whole rows; four: more tasks than a row's KV heads, so spans of keys
            torch.set_num_threads(n)
            out = torch.full((B * Q, H * D), float("nan"))
            ops.chunk_attention(q, out, None, Q, k_cache, v_cache, blocks, torch.tensor(lens), block_size)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    wide, narrow = torch.empty_like(out), torch.empty_like(out)
    ops.chunk_attention(q, wide, None, Q, k_cache, v_cache, blocks, torch.tensor(lens), block_size)
    ops.chunk_attention(q, narrow, None, Q, k_cache, v_cache, blocks, torch.tensor(lens), block_size, isa="avx2")
    assert torch.equal(narrow, wide)  # 16 lanes or 8 (on as many threads), each query's sums run in the same order

    # Rows scattered among other tokens, as a step packs them: read and written at token_index, others left alone.
    T = B * Q + 5
    packed = torch.randn(T, (H + 2 * KV) * D, generator=g)
    index = torch.randperm(T, generator=g)[: B * Q]
    packed[index, : H * D] = q
    out = torch.full((T, H * D), float("nan"))
    ops.chunk_attention(packed[:, : H * D], out, index, Q, k_cache, v_cache, blocks, torch.tensor(lens), block_size)
    torch.testing.assert_close(out[index], want, rtol=1e-5, atol=1e-5)
    others = torch.ones(T, dtype=torch.bool)
    others[index] = False
    assert out[others].isnan().all()


def test_layer_ops_refuse_what_they_cannot_read(ops):
    with pytest.raises(ValueError):
        ops.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-5)
    with pytest.raises(ValueError):
        ops.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-5, add=torch.randn(3, 8))
    cache = torch.zeros(8, 2, 4)
    with pytest.raises(ValueError):  # qkv not (H + 2 KV) D wide
        ops.rope_write_kv(torch.randn(2, 15), (2, 2, 4), torch.tensor([0, 1]), torch.ones(8, 4), torch.ones(8, 4),
                          torch.tensor([0, 1]), cache, cache.clone())  # fmt: skip
    with pytest.raises(ValueError):  # int32 positions
        ops.rope_write_kv(torch.randn(2, 24), (2, 2, 4), torch.tensor([0, 1], dtype=torch.int32), torch.ones(8, 4),
                          torch.ones(8, 4), torch.tensor([0, 1]), cache, cache.clone())  # fmt: skip
    with pytest.raises(ValueError):  # a block table per row
        ops.decode_attention(torch.randn(2, 8), torch.empty(2, 8), None, cache, cache.clone(), torch.zeros(1, 2, dtype=torch.int64),
                             torch.tensor([1, 1]), 4)  # fmt: skip
    blocks = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError):  # heads of 4: the chunk kernel's tiles take multiples of 8
        ops.chunk_attention(torch.randn(2, 8), torch.empty(2, 8), None, 2, cache, cache.clone(), blocks, torch.tensor([2]), 4)
    wide = torch.zeros(8, 1, 8)
    with pytest.raises(ValueError):  # 3 queries cannot be the last tokens of a 2-token context
        ops.chunk_attention(torch.randn(3, 8), torch.empty(3, 8), None, 3, wide, wide.clone(), blocks, torch.tensor([2]), 4)
    with pytest.raises(ValueError):  # token_index not one per query
        ops.chunk_attention(torch.randn(3, 8), torch.empty(3, 8), torch.tensor([0, 1]), 3, wide, wide.clone(), blocks,
                            torch.tensor([5]), 4)  # fmt: skip


def test_attention_refuses_step_metadata_past_the_cache_before_the_ops_index_it():
    """The C ops index the caches by slot unchecked: a slot, block or position past them is a ValueError, once per step."""
    from lora_serve.model.attention import Attention, AttentionGroup, AttentionMetadata

    attn = Attention(4, 2, 8)
    attn.k_cache, attn.v_cache = torch.zeros(32, 2, 8), torch.zeros(32, 2, 8)  # 8 blocks of 4

    def meta(positions, slots, blocks, lens, token_index=None):
        index = None if token_index is None else torch.tensor(token_index)
        group = AttentionGroup(token_index=index, context_blocks=torch.tensor(blocks), key_len=max(lens), context_lens=torch.tensor(lens),
                               mask=None, causal=False, batch_size=len(lens), query_len=1)  # fmt: skip
        return AttentionMetadata(torch.tensor(positions), torch.tensor(slots), 4, [group], torch.arange(len(lens)))

    attn.check_bounds(meta([5, 9], [6, 31], [[1, 0], [7, 2]], [6, 8]), num_positions=16)  # all within
    for bad in (
        meta([5, 16], [6, 31], [[1, 0], [7, 2]], [6, 8]),  # a position past the rotary tables
        meta([5, 9], [6, 32], [[1, 0], [7, 2]], [6, 8]),  # a slot past the cache
        meta([5, 9], [6, -1], [[1, 0], [7, 2]], [6, 8]),
        meta([5, 9], [6, 31], [[1, 0], [8, 2]], [6, 8]),  # a block past the cache
        meta([5, 9], [6, 31], [[1, 0], [7, 2]], [6, 9]),  # more keys than the row's blocks hold
        meta([5, 9], [6, 31], [[1, 0], [7, 2]], [6, 8], token_index=[0, 2]),  # a query row past the step's 2 tokens
    ):
        with pytest.raises(ValueError):
            attn.check_bounds(bad, num_positions=16)
