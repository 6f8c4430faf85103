"""The CPU kernels (model/cpu_kernels.c) against float64 references, and their build and fallback."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from lora_serve.model import cpu_kernels as ck


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """cpu_kernels() forgets its cached result and builds into an empty cache folder; restored after."""
    monkeypatch.setenv("LORA_SERVE_CACHE", str(tmp_path))
    ck._load.cache_clear()
    yield tmp_path
    ck._load.cache_clear()


def ref_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("isa", ["auto", "avx2"])  # auto: AVX-512 where the CPU has it
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 13, 33, 128])
@pytest.mark.parametrize("n,k", [(960, 576), (7, 1536), (33, 20), (2, 16)])  # odd N, N % 4; K not a multiple of 8
def test_linear_matches_float64(kernels, m, n, k, isa):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = kernels.linear(x, w, isa=isa)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref_linear(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


def test_linear_reads_strided_rows_and_adds_bias(kernels):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 100, generator=g)
    x = wide[:, 10:74]  # rows of stride 100
    w, b = torch.randn(9, 64, generator=g), torch.randn(9, generator=g)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_a_rows_result_does_not_depend_on_its_batch(kernels, isa):
    """One fixed order per output element: row i alone, in a batch of 4, 8 or 37 gives the same bits."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 580, generator=g), torch.randn(131, 580, generator=g)  # K and N with tails
    full = kernels.linear(x, w, isa=isa)
    for i in (0, 3, 5, 36):
        assert torch.equal(kernels.linear(x[i : i + 1], w, isa=isa), full[i : i + 1])
    assert torch.equal(kernels.linear(x[4:8], w, isa=isa), full[4:8])
    assert torch.equal(kernels.linear(x[8:16], w, isa=isa), full[8:16])
    assert torch.equal(kernels.linear(x[1:14], w, isa=isa), full[1:14])


def test_linear_refuses_what_it_cannot_read(kernels):
    with pytest.raises(ValueError):
        kernels.linear(torch.randn(2, 8).t(), torch.randn(4, 2))  # columns not contiguous
    with pytest.raises(ValueError):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 8).half())


def test_lora_over_segments_matches_float64(kernels):
    """Segments of mixed ranks (tails past a multiple of 8 included), one to nine rows, rows of no segment
    in between, a slot that does not target the projection; each adapter's slices add into column
    slices of a wider output (136 outputs: two blocks of 64 and a tail of 8; and 7)."""
    g = torch.Generator().manual_seed(3)
    k, t = 72, 20
    x = torch.randn(t, k, generator=g)
    ranks = {0: 16, 2: 4, 3: 12, 5: 48}  # slot -> rank; slot 1 holds an adapter that skips this projection
    segments = [(0, 0, 1), (2, 1, 4), (1, 4, 6), (3, 6, 15), (5, 15, 16)]  # rows 16.. have no adapter
    table = ck.SlotTable(k)
    table.set(4, (torch.randn(8, k, generator=g) / 8).half(), torch.ones(8), [])  # set, then cleared: not read
    table.set(4, None)
    table.set(1, None)
    weights = {}
    for slot, r in ranks.items():
        a = (torch.randn(r, k, generator=g) / 8).half()
        sc = torch.rand(r, generator=g) + 0.5
        slices = []
        for hcol, width, ycol, out in ((0, r // 2, 3, 136), (r // 2, r - r // 2, 140, 7)):
            slices.append((hcol, (torch.randn(width, out, generator=g) / 8).half().t(), ycol))  # [out, width] over [width, out] memory
        table.set(slot, a, sc, slices)
        weights[slot] = (a, sc, slices)
    h = torch.full((t, 48), float("nan"))
    y0 = torch.randn(t, 150, generator=g)
    y = y0.clone()
    kernels.lora(x, h, y, ck.SegmentTable(segments), table)

    want = y0.double().clone()
    for slot, lo, hi in segments:
        if slot not in weights:
            continue
        a, sc, slices = weights[slot]
        xa = (x[lo:hi].double() @ a.double().t()) * sc.double()
        torch.testing.assert_close(h[lo:hi, : a.shape[0]].double(), xa, rtol=1e-5, atol=1e-5)
        for hcol, b, ycol in slices:
            want[lo:hi, ycol : ycol + b.shape[0]] += xa[:, hcol : hcol + b.shape[1]] @ b.double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert h[4:6].isnan().all() and h[16:].isnan().all()  # rows of no adapter here: h not written, y unchanged
    assert torch.equal(y[4:6], y0[4:6]) and torch.equal(y[16:], y0[16:])


def test_a_rows_lora_does_not_depend_on_its_segment_or_the_isa(kernels):
    """Prefill-long segments run in tiles of rows (and 16 lanes where the CPU has AVX-512): each row still
    gets the bits it gets alone, on either path, and matches float64. K = 576, a multiple of 16 (the tiled
    shrink); odd and even ranks; 200 outputs (three full blocks and a tail of 8)."""
    g = torch.Generator().manual_seed(5)
    k, out = 576, 200
    table = ck.SlotTable(k)
    weights = {}
    for slot, r in {0: 16, 1: 7, 2: 1}.items():
        a, sc = (torch.randn(r, k, generator=g) / 8).half(), torch.rand(r, generator=g) + 0.5
        b = (torch.randn(r, out, generator=g) / 8).half().t()
        table.set(slot, a, sc, [(0, b, 0)])
        weights[slot] = (a, sc, b)
    segments = [(0, 0, 37), (1, 37, 46), (2, 46, 51), (0, 51, 52)]
    x, y0 = torch.randn(52, k, generator=g), torch.randn(52, out, generator=g)
    results = {}
    for isa in ("auto", "avx2"):
        y = y0.clone()
        kernels.lora(x, torch.empty(52, 16), y, ck.SegmentTable(segments), table, isa=isa)
        results[isa] = y
    assert torch.equal(results["auto"], results["avx2"])
    for slot, lo, hi in segments:
        a, sc, b = weights[slot]
        want = y0[lo:hi].double() + ((x[lo:hi].double() @ a.double().t()) * sc.double()) @ b.double().t()
        torch.testing.assert_close(results["auto"][lo:hi].double(), want, rtol=1e-5, atol=1e-5)
        for t in (lo, hi - 1, (lo + hi) // 2):
            alone = y0[t : t + 1].clone()
            kernels.lora(x[t : t + 1], torch.empty(1, 16), alone, ck.SegmentTable([(slot, 0, 1)]), table)
            assert torch.equal(alone, results["auto"][t : t + 1])


def test_decode_rows_read_in_pairs_get_the_bits_each_gets_alone(kernels):
    """A decode step's one-row segments are shrunk two adapters at a time (segments s and s + ceil(S/2)) where
    both have the ranks: pairs of unequal ranks (16 with 7, odd ranks with a last rank alone), a rank-1 adapter,
    a slot that does not target the projection, one adapter in two segments, an odd count (the last segment
    unpaired) and a prefill segment among them. Every row matches float64 and equals its row alone, on either
    ISA; rows of no adapter are untouched."""
    g = torch.Generator().manual_seed(6)
    k, out = 576, 136
    table = ck.SlotTable(k)
    weights = {}
    for slot, r in {0: 16, 1: 7, 2: 1, 4: 16, 5: 9}.items():
        a, sc = (torch.randn(r, k, generator=g) / 8).half(), torch.rand(r, generator=g) + 0.5
        b = (torch.randn(r, out, generator=g) / 8).half().t()
        table.set(slot, a, sc, [(0, b, 0)])
        weights[slot] = (a, sc, b)
    table.set(3, None)
    slots = [0, 4, 1, 5, 2, 3, 0, 4, 5, 1, 0]  # pairs (0, 6): 0 with 0, (1, 7): 4 with 4, (2, 8): 1 with 5, ...
    segments = [(slot, i, i + 1) for i, slot in enumerate(slots)] + [(5, 11, 17), (1, 18, 19)]  # a prefill chunk; row 17 of none
    t = 19
    x, y0 = torch.randn(t, k, generator=g), torch.randn(t, out, generator=g)
    results = {}
    for isa in ("auto", "avx2"):
        y = y0.clone()
        kernels.lora(x, torch.empty(t, 16), y, ck.SegmentTable(segments), table, isa=isa)
        results[isa] = y
    assert torch.equal(results["auto"], results["avx2"])
    y = results["auto"]
    for slot, lo, hi in segments:
        if slot not in weights:
            assert torch.equal(y[lo:hi], y0[lo:hi])
            continue
        a, sc, b = weights[slot]
        want = y0[lo:hi].double() + ((x[lo:hi].double() @ a.double().t()) * sc.double()) @ b.double().t()
        torch.testing.assert_close(y[lo:hi].double(), want, rtol=1e-5, atol=1e-5)
        for row in range(lo, hi):
            alone = y0[row : row + 1].clone()
            kernels.lora(x[row : row + 1], torch.empty(1, 16), alone, ck.SegmentTable([(slot, 0, 1)]), table)
            assert torch.equal(alone, y[row : row + 1]), (slot, row)
    assert torch.equal(y[17], y0[17])


def test_a_slot_table_follows_its_slots_through_many_sets(kernels):
    """Slots re-set and cleared many times (the blocks of old adapters compacted away) read only what each slot holds now."""
    g = torch.Generator().manual_seed(4)
    k, out = 16, 130
    table = ck.SlotTable(k)
    held = {}
    for i in range(600):
        slot = i % 7
        if i % 5 == 0:
            table.set(slot, None)
            held.pop(slot, None)
            continue
        r = 1 + i % 9
        a, sc = torch.randn(r, k, generator=g).half(), torch.rand(r, generator=g)
        b = torch.randn(r, out, generator=g).half().t()
        table.set(slot, a, sc, [(0, b, 0)])
        held[slot] = (a, sc, b)
    # 3 blocks a set, ~1440 in all: compaction keeps them under twice what the 7 slots hold, plus 1024 (and one set's)
    assert table._num_blocks <= 2 * 7 * 3 + 1024 + 3
    x = torch.randn(7, k, generator=g)
    y = torch.zeros(7, out)
    kernels.lora(x, torch.empty(7, table.max_r), y, ck.SegmentTable([(s, s, s + 1) for s in range(7)]), table)
    for s in range(7):
        want = torch.zeros(out, dtype=torch.float64)
        if s in held:
            a, sc, b = held[s]
            want = ((x[s].double() @ a.double().t()) * sc.double()) @ b.double().t()
        torch.testing.assert_close(y[s].double(), want, rtol=1e-5, atol=1e-5)


def test_segment_and_slot_tables_refuse_what_the_kernels_cannot_read(kernels):
    table = ck.SlotTable(8)
    with pytest.raises(ValueError):
        table.set(0, torch.randn(4, 8), torch.ones(4))  # float32 A
    with pytest.raises(ValueError):
        table.set(0, torch.randn(4, 8).half(), torch.ones(4), [(0, torch.randn(8, 4).half(), 0)])  # [O, r] memory: [r, O] is read
    table.set(0, torch.randn(4, 8).half(), torch.ones(4), [(0, torch.randn(4, 8).half().t(), 0)])
    with pytest.raises(ValueError):
        kernels.lora(torch.randn(3, 8), torch.empty(3, 4), torch.zeros(3, 8), ck.SegmentTable([(0, 0, 5)]), table)  # past the last row
    with pytest.raises(ValueError):
        kernels.lora(torch.randn(3, 8), torch.empty(3, 4), torch.zeros(3, 8), ck.SegmentTable([(1, 0, 3)]), table)  # no such slot
    with pytest.raises(ValueError):
        ck.SegmentTable([(0, 3, 2)])


def test_builds_into_an_empty_cache_once_then_loads_without_a_compiler(fresh_build, monkeypatch):
    if ck._missing_cpu_features():
        pytest.skip(ck._missing_cpu_features())
    k, why = ck.cpu_kernels()
    assert k is not None, why
    built = list((fresh_build / "kernels").glob("lora_cpu_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    ck._load.cache_clear()
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))  # as in a container image: built, no compiler
    assert ck.cpu_kernels()[0] is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert not [p for p in (fresh_build / "kernels").iterdir() if p not in built]  # no temporary file left


def test_without_a_compiler_says_why(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    k, why = ck.cpu_kernels()
    assert k is None
    assert why and ("no-such-cc" in why or platform.machine() not in ("x86_64", "AMD64") or "lacks" in why)


def test_a_failing_build_says_why(fresh_build, monkeypatch):
    if ck._missing_cpu_features():
        pytest.skip(ck._missing_cpu_features())
    monkeypatch.setenv("CC", "false")  # runs, prints no version, exits 1
    k, why = ck.cpu_kernels()
    assert k is None and "failed" in why
    assert not list((fresh_build / "kernels").glob("*.so"))
