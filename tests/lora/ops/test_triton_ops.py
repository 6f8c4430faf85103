"""The fused Triton LoRA kernels, run by triton's interpreter on CPU tensors, against a float64 reference.

The float64 reference is computed from the adapters' own A, B and scale, not from the slots
(random_slots.py). Cases: random segment layouts with ranks 1-64 mixed in one call, targets that skip
slices, empty segments, base-only rows, the merged adapter's negation overlapping other
segments, decode-sized and prefill-sized segments, split-K; float32 and float16 activations, float32
and float16 slots (LoRAConfig.lora_dtype; the interpreter computes bfloat16 dot products wrongly, so
bfloat16 is left to lora_serve/bench/gpu_check.py on a GPU).
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")

from lora_serve.lora.ops.segments import split_passes  # noqa: E402
from lora_serve.lora.ops.triton_ops import TritonLoRABatch, kernel_tables  # noqa: E402

from .random_slots import random_slots, reference  # noqa: E402

FEATURES = 40  # not a multiple of the 64-wide reduction tile: the masks are exercised
OUTS = {"q_proj": 48, "k_proj": 24, "v_proj": 24}  # a fused q/k/v with GQA-like slice sizes
MAX_RANK = 64
SLOTS = 10  # the last one plays the merged adapter's negation
# Largest error relative to max(|delta|, 1) per dtype of activations or slots, the coarser of the two.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    # Triton picks the interpreter when a kernel is wrapped; triton_kernels wraps once per mode, on first use.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def fill(ranks: dict[int, dict[str, int]], seed: int, slot_dtype=torch.float32):
    """ranks: slot -> {slice: rank}. Scales alternate in sign so that deltas can cancel."""
    return random_slots(FEATURES, OUTS, ranks, seed, lambda slot: (-1) ** slot * 0.25 * (slot + 1), 1 / 8, slot_dtype)


def check(segments, ranks, num_rows, dtype, seed=0, slot_dtype=torch.float32):
    slots, terms = fill(ranks, seed, slot_dtype)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(num_rows, FEATURES, generator=g).to(dtype)
    y0 = torch.randn(num_rows, sum(OUTS.values()), generator=g).to(dtype)
    y = y0.clone()
    TritonLoRABatch(segments).apply(slots, x, y)
    ref = reference(x, y0, segments, terms)
    delta = (ref - y0.double()).abs().max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= max(TOLERANCE[dtype], TOLERANCE[slot_dtype]) * max(delta, 1.0)
    covered = torch.zeros(num_rows, dtype=torch.bool)
    for slot, lo, hi in segments:
        if terms[slot]:
            covered[lo:hi] = True
    assert torch.equal(y[~covered], y0[~covered])  # rows of no adapter (or of one that skips this projection): bit for bit


def random_case(seed: int):
    rng = random.Random(seed)
    ranks = {}
    for slot in range(SLOTS):
        targeted = [n for n in OUTS if rng.random() < 0.75]
        ranks[slot] = {n: rng.choice([1, 2, 7, 16, 17, 33, 64]) for n in targeted}
    segments, row = [], 0
    for slot in rng.sample(range(SLOTS - 1), rng.randint(3, SLOTS - 1)):
        n = rng.choice([0, 1, 1, 2, 5, 19])
        segments.append((slot, row, row + n))
        row += n
    if row:
        segments.append((SLOTS - 1, 0, row))  # overlaps every adapter row, as while an adapter is merged
    return segments, ranks, row + rng.randint(0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seed", range(3))
def test_random_layouts_match_float64(seed, dtype):
    segments, ranks, num_rows = random_case(seed)
    check(segments, ranks, max(num_rows, 1), dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16-x", "fp32-x"])
@pytest.mark.parametrize("seed", range(2))
def test_float16_slots_match_float64(seed, dtype):
    segments, ranks, num_rows = random_case(seed)
    check(segments, ranks, max(num_rows, 1), dtype, seed, slot_dtype=torch.float16)


def test_every_rank_from_1_to_64_in_one_call():
    ranks = {
        slot: {"q_proj": r, "k_proj": max(1, 64 - r), "v_proj": (r * 7) % 64 + 1}
        for slot, r in enumerate([1, 15, 16, 31, 48, 63, 64, 3, 9])
    }
    segments = [(slot, slot, slot + 1) for slot in range(9)]  # decode: one row per adapter
    check(segments, ranks, 11, torch.float32)


def test_prefill_segments_span_several_row_tiles():
    check([(2, 0, 70), (5, 70, 150)], {2: {"q_proj": 8, "v_proj": 64}, 5: {"k_proj": 33}}, 153, torch.float16)


def test_empty_segments_and_untargeted_projections_add_nothing():
    ranks = {0: {"q_proj": 4}, 1: {}, 2: {"v_proj": 12}}
    check([(0, 0, 0), (1, 0, 3), (2, 3, 3), (0, 3, 5)], ranks, 6, torch.float32)


def test_split_k_partial_sums_add_up(monkeypatch):
    monkeypatch.setattr(TritonLoRABatch, "_split_k", staticmethod(lambda *args: 2))
    segments, ranks, num_rows = random_case(7)
    check(segments, ranks, max(num_rows, 1), torch.float32, seed=7)


@pytest.mark.parametrize(
    ("num_segs", "num_slices", "rows", "features", "split"),
    [
        (64, 3, 1, 4096, 8),  # Llama-3-8B decode, one row per adapter: q/k/v
        (64, 1, 1, 4096, 8),  # o_proj, and gate/up below
        (64, 2, 1, 4096, 8),
        (64, 1, 1, 14336, 16),  # down_proj: a longer reduction splits further
        (8, 3, 1, 2048, 4),  # a 1B-sized reduction keeps 8 tiles of 64 a program
        (64, 3, 1, 256, 1),  # too short a reduction to split
        (64, 3, 200, 4096, 1),  # prefill-sized segments: twice the SMs' count in row tiles alone
        (9, 3, 100, 4096, 8),  # a few of them still split
    ],
)
def test_split_k_fills_about_one_wave_for_decode(monkeypatch, num_segs, num_slices, rows, features, split):
    from types import SimpleNamespace

    from lora_serve.lora.ops import triton_ops

    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 132)  # an H100 / H200
    x = SimpleNamespace(device=torch.device("cuda", 0), shape=(num_segs * rows, features))  # no GPU needed to size the grid
    got = TritonLoRABatch._split_k(x, num_segs, num_slices, rows)
    assert got == split
    assert rows > 16 or got == 1 or features >= 8 * 64 * got  # a decode program reduces over at least 8 tiles of BLOCK_K


def test_shrink_writes_only_the_rank_columns_of_each_rows_adapter():
    # The interpreter runs programs one after another, which would hide a write past an adapter's rank
    # that a later program overwrites; on a GPU that is a race. So: nothing else in the buffer may change.
    from lora_serve.lora.ops import triton_kernels

    segments = [(0, 0, 3), (1, 3, 4), (2, 4, 4), (3, 4, 9)]
    slots, _ = fill({0: {"q_proj": 5, "v_proj": 17}, 1: {"k_proj": 1}, 2: {"q_proj": 64}, 3: {"q_proj": 33, "k_proj": 2, "v_proj": 30}}, 0)
    segs = torch.tensor(
        [[slot for slot, _, _ in segments], [lo for _, lo, _ in segments], [hi - lo for _, lo, hi in segments]], dtype=torch.int32
    )
    tables = kernel_tables(slots)
    assert tables.width == 65  # the widest adapter's own ranks (33 + 2 + 30), not 3 x max_rank
    buf = torch.full((1, 10, tables.width), float("nan"))
    triton_kernels.shrink(torch.randn(10, FEATURES), tables, segs, len(segments), 5, buf, 1)
    written = ~buf[0].isnan()
    for slot, lo, hi in segments:
        used = torch.zeros(tables.width, dtype=torch.bool)
        used[: slots.entries[slot].A.shape[0]] = True
        assert (written[lo:hi] == used).all(), slot
    assert not written[9].any()  # a base-only row


def test_overlapping_segments_go_to_separate_passes():
    segments = [(0, 0, 2), (1, 2, 5), (9, 0, 5), (3, 5, 5)]
    passes = split_passes(segments)
    assert len(passes) == 2
    for group in passes:
        spans = sorted((lo, hi) for _, lo, hi in group if hi > lo)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert sorted(s for p in passes for s in p) == sorted(segments)


def test_kernel_tables_follow_fill_and_clear():
    slots, _ = fill({4: {"q_proj": 5, "v_proj": 3}}, seed=0)
    tables = kernel_tables(slots)
    assert tables.meta[4].tolist() == [[5, 0, 3], [0, 0, 5]]  # ranks; first row of each slice in the packed A
    entry = slots.entries[4]
    assert tables.ptrs[4].tolist() == [entry.A.data_ptr(), entry.layout[0][3].data_ptr(), 0, entry.layout[1][3].data_ptr()]
    assert tables.scales[4].tolist() == [entry.layout[0][4], 0.0, entry.layout[1][4]]
    assert kernel_tables(slots) is tables  # unchanged slots: the same tables
    slots.clear(4)
    tables = kernel_tables(slots)
    assert not tables.meta[4].any() and not tables.ptrs[4].any()


@pytest.mark.parametrize("slots", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_kernels_compile_for_a_gpu(arch, slots, monkeypatch, tmp_path):
    # The interpreter runs the kernels as Python; compiling them (to a cubin, no GPU needed) checks what only
    # the compiler sees: types, supported constructs, resources. bfloat16 activations, split-K, float32 or
    # bfloat16 slots (bf16 is what lora_dtype auto gives a bf16 base on CUDA).
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from lora_serve.lora.ops import triton_kernels

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, said out loud (it warns otherwise)
    pointers = {"x_ptr": "*bf16", "y_ptr": "*bf16", "seg_ptr": "*i32", "meta_ptr": "*i32", "buf_ptr": "*fp32",
                "ptr_ptr": "*i64", "scale_ptr": "*fp32", "a_ref": f"*{slots}", "b_ref": f"*{slots}"}  # fmt: skip
    tiles = dict(SPLIT_K=2, BLOCK_M=16, BLOCK_R=16, FP32=False, NUM_SLICES=3, PTRS=4)
    shrink, expand = triton_kernels._shrink_kernel, triton_kernels._expand_kernel
    for fn, extra in [(shrink, dict(BLOCK_K=64)), (expand, dict(BLOCK_N=64)), (expand, dict(BLOCK_N=triton_kernels.BLOCK_N_DECODE))]:
        kernel = triton.jit(fn)
        constexprs = {**tiles, **extra}
        signature = {
            a: "constexpr" if a in constexprs else pointers.get(a, f"*{slots}" if a.endswith("_ptr") else "i32") for a in kernel.arg_names
        }
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"]
