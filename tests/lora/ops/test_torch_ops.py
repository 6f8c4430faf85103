"""The torch backend's segmented LoRA against a float64 reference built from the raw weights.

Each case fills ProjectionSlots for a fused q/k/v-shaped projection with random adapters and
checks y = base + Σ over a row's segments of scale·(x·Aᵀ)·Bᵀ, computed in float64 from the
adapters' own tensors (random_slots.py), for both ways the op can run: grouped
(batched matmuls over the stacked adapters of one layout) and per segment, with float32 slots and with bfloat16 and
float16 ones (LoRAConfig.lora_dtype; still a float32 intermediate).
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_serve.lora.lora_model import LoRAWeights
from lora_serve.lora.ops.torch_ops import KERNEL_SEGMENT_ROWS, SegmentedLoRABatch

from .random_slots import random_slots, reference

IN, SLICES, MAX_RANK, NUM_SLOTS = 48, {"q_proj": 32, "k_proj": 16, "v_proj": 16}, 16, 9


def run(segments, layouts, rows: int, seed: int = 0, dtype=torch.float32, slot_dtype=torch.float32, kernels=None):
    slots, terms = random_slots(IN, SLICES, layouts, seed, lambda slot: 0.5 + slot, slot_dtype=slot_dtype, kernels=kernels)
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y0 = torch.randn(rows, sum(SLICES.values()), generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    y = y0.clone()
    batch = SegmentedLoRABatch(segments)
    batch.apply(slots, x, y)
    return batch, y, reference(x, y0, segments, terms), y0


ALL16 = {"q_proj": 16, "k_proj": 16, "v_proj": 16}


def test_decode_rows_one_per_slot_run_as_one_dense_group():
    segments = [(s, s, s + 1) for s in range(6)]  # slots 0..5, one row each, then 2 base rows
    batch, y, ref, y0 = run(segments, {s: ALL16 for s in range(6)}, rows=8)
    ((_, group),) = batch.passes
    assert group is not None and group.dense()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[6:], y0[6:])  # base-only rows untouched


def test_uneven_segments_are_padded_and_scattered_back():
    segments = [(1, 0, 3), (2, 3, 4), (4, 4, 6)]
    batch, y, ref, y0 = run(segments, {1: ALL16, 2: ALL16, 4: ALL16, 3: {"q_proj": 8}}, rows=7)
    ((_, group),) = batch.passes
    assert group is not None and not group.dense()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[6:], y0[6:])


def test_slots_that_do_not_target_a_projection_add_exactly_nothing():
    # Slot 1 targets only o_proj elsewhere: it has no entry on this projection.
    segments = [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    batch, y, ref, y0 = run(segments, {0: ALL16, 1: {}, 2: ALL16}, rows=3)
    assert batch.passes[0][1] is not None
    assert torch.equal(y[1], y0[1])
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cpu_kernels_on", [False, True], ids=["torch", "cpu-kernels-fp16"])
def test_random_layouts_mixed_ranks_and_overlap(request, seed, cpu_kernels_on):
    rng = random.Random(seed)
    used = rng.sample(range(NUM_SLOTS - 1), rng.randint(1, 6))
    same = rng.random() < 0.5  # one shared layout (grouped) or mixed ranks and targets (per segment)
    layouts = {}
    for slot in used:
        layouts[slot] = ALL16 if same else {n: rng.randint(1, MAX_RANK) for n in SLICES if rng.random() < 0.7}
    segments, row = [], 0
    for slot in sorted(used):
        n = rng.choice([0, 1, 1, 2, 5])  # 0: an empty segment
        segments.append((slot, row, row + n))
        row += n
    base_rows = rng.randint(0, 3)
    rows = row + base_rows
    merged = NUM_SLOTS - 1  # the negated merged adapter covers every adapter row (lora/merge.py)
    layouts[merged] = {"q_proj": 3, "v_proj": 7}
    if row:
        segments.append((merged, 0, row))
    if cpu_kernels_on:  # float16 slots read by the CPU kernels, one shrink and one expand call per pass
        _, y, ref, y0 = run(
            segments, layouts, rows=max(rows, 1), seed=seed, slot_dtype=torch.float16, kernels=request.getfixturevalue("kernels")
        )
        delta = (ref - y0.double()).abs().max().item()
        assert (y.double() - ref).abs().max().item() <= 2e-3 * max(delta, 1e-6)  # float16 weights: 2^-11 rounding
    else:
        _, y, ref, y0 = run(segments, layouts, rows=max(rows, 1), seed=seed)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[row:], y0[row:])


def test_bfloat16_activations_keep_a_float32_intermediate():
    segments = [(s, s, s + 1) for s in range(4)]
    _, y, ref, _ = run(segments, {s: ALL16 for s in range(4)}, rows=4, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=5e-2)


def test_a_prefill_segment_runs_alone_while_the_decode_rows_around_it_are_grouped():
    segments = [(0, 0, 1), (1, 1, 2), (2, 2, 40), (3, 40, 41), (4, 41, 42)]
    batch, y, ref, _ = run(segments, {s: ALL16 for s in range(5)}, rows=43)
    ((loop, group),) = batch.passes
    assert loop == [(2, 2, 40)] and group.slots == [0, 1, 3, 4] and not group.dense()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_empty_segments_between_one_row_segments_do_not_break_the_dense_view():
    segments = [(0, 0, 1), (1, 1, 1), (2, 1, 2)]
    batch, y, ref, _ = run(segments, {s: ALL16 for s in range(3)}, rows=2)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
@pytest.mark.parametrize("slot_dtype", [torch.bfloat16, torch.float16], ids=["bf16-slots", "fp16-slots"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-segment"])
def test_half_precision_slots_match_float64(grouped, slot_dtype, dtype):
    # Grouped: decode rows of one shared layout; per segment: prefill-sized segments of mixed ranks and
    # targets, and the merged adapter's negation over them (slot 8).
    if grouped:
        segments, layouts = [(s, s, s + 1) for s in range(5)], {s: ALL16 for s in range(5)}
    else:
        segments = [(0, 0, 9), (2, 9, 14), (3, 14, 20), (5, 20, 20), (8, 0, 20)]
        layouts = {0: {"q_proj": 5, "v_proj": 16}, 2: {"k_proj": 1}, 3: ALL16, 5: {"q_proj": 7}, 8: {"q_proj": 3, "v_proj": 7}}
    adapter_rows = segments[-1][2]
    batch, y, ref, y0 = run(segments, layouts, rows=adapter_rows + 2, dtype=dtype, slot_dtype=slot_dtype)
    assert all((group is not None) == grouped for _, group in batch.passes)
    assert y.dtype == dtype
    # Error relative to the largest delta: the slots' rounding (2^-9 bf16, 2^-12 fp16) and, for bf16 x and y, y's.
    delta = (ref - y0.double()).abs().max().item()
    tolerance = 2e-2 if torch.bfloat16 in (dtype, slot_dtype) else 2e-3
    assert (y.double() - ref).abs().max().item() <= tolerance * delta
    assert torch.equal(y[adapter_rows:], y0[adapter_rows:])


def test_cpu_kernels_take_every_segment_and_follow_the_slots(kernels):
    """Float16 slots on the CPU kernels: decode rows and a prefill-sized segment in one call per pass, one
    longer than the kernels take (MKL's), the merged adapter's negation over every row in a second pass;
    after a slot is cleared its rows receive nothing, and once refilled with other weights they receive those."""
    segments = [(0, 0, 1), (1, 1, 2), (2, 2, 42), (3, 42, 44), (4, 44, 44 + KERNEL_SEGMENT_ROWS + 1), (8, 0, 44)]
    rows = 44 + KERNEL_SEGMENT_ROWS + 1
    layouts = {
        0: ALL16,
        1: {"q_proj": 5, "v_proj": 16},
        2: ALL16,
        3: {"k_proj": 1},
        4: {"q_proj": 8, "k_proj": 2},
        8: {"q_proj": 3, "v_proj": 7},
    }
    slots, terms = random_slots(IN, SLICES, layouts, 7, lambda slot: 0.5 + slot, slot_dtype=torch.float16, kernels=kernels)
    x = torch.randn(rows + 2, IN, generator=torch.Generator().manual_seed(8))
    y0 = torch.randn(rows + 2, sum(SLICES.values()), generator=torch.Generator().manual_seed(9))

    def check(terms) -> None:
        ref = reference(x, y0, segments, terms)
        y = y0.clone()
        SegmentedLoRABatch(segments).apply(slots, x, y)
        assert (y.double() - ref).abs().max().item() <= 2e-3 * (ref - y0.double()).abs().max().item()
        assert torch.equal(y[rows:], y0[rows:])  # base rows

    check(terms)
    slots.clear(3)
    check({**terms, 3: []})
    other, other_terms = random_slots(IN, SLICES, {3: ALL16}, 11, lambda slot: 2.0)
    slots.fill(3, [w for _, w in other_terms[3]])
    check({**terms, 3: other_terms[3]})


def test_a_kept_stack_is_patched_as_adapters_come_and_go_and_stays_exact():
    """Live traffic: the decode group changes between steps (an adapter leaves, another arrives, a slot
    is refilled with new weights). The stacked block is patched (one adapter copied, not the group)
    and every step still matches the reference built from the adapters' own weights."""
    slots, terms = random_slots(IN, SLICES, {s: ALL16 for s in range(NUM_SLOTS)}, 0, lambda slot: 0.5 + slot)
    signature = slots.entries[0].signature

    def step(slot_rows: list[tuple[int, int]], seed: int) -> None:
        segments, row = [], 0
        for slot, n in slot_rows:
            segments.append((slot, row, row + n))
            row += n
        x = torch.randn(row + 1, IN, generator=torch.Generator().manual_seed(seed))  # one base row at the end
        y0 = torch.randn(row + 1, sum(SLICES.values()), generator=torch.Generator().manual_seed(seed + 1))
        y = y0.clone()
        batch = SegmentedLoRABatch(segments)
        assert batch.passes[0][1] is not None  # grouped
        batch.apply(slots, x, y)
        torch.testing.assert_close(y.double(), reference(x, y0, segments, terms), rtol=1e-5, atol=1e-4)
        assert torch.equal(y[row:], y0[row:])

    step([(s, 1) for s in range(6)], 10)  # built: slots 0..5
    built = slots.stacks[signature]
    step([(s, 1) for s in range(1, 7)], 20)  # 0 leaves, 6 arrives: copied where 0 was
    assert slots.stacks[signature] is built and built.num_patches == 1
    g = torch.Generator().manual_seed(99)  # slot 3 refilled with another adapter: a new entry, copied again
    fresh = [LoRAWeights(torch.randn(16, IN, generator=g), torch.randn(out, 16, generator=g), 0.25) for out in SLICES.values()]
    slots.fill(3, fresh)
    terms[3] = [(slice(o, o + n), w) for o, n, w in zip((0, 32, 48), SLICES.values(), fresh)]
    step([(s, 1) for s in range(1, 7)], 30)
    assert slots.stacks[signature] is built and built.num_patches == 2
    step([(1, 2), (2, 1), (7, 3), (5, 1), (6, 2)], 40)  # uneven rows; 7 takes a free position
    assert slots.stacks[signature] is built and built.num_patches == 3
    step([(2, 1), (8, 1)], 50)  # mostly stale: rebuilt at the group's size
    assert slots.stacks[signature] is not built and slots.stacks[signature].capacity == 2
