"""The CPU kernels (model/cpu_kernels.c) against float64 references, and their build and fallback."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from lora_serve.model import cpu_kernels as ck


@pytest.fixture(scope="module")
def kernels() -> ck.CPUKernels:
    k, why = ck.cpu_kernels()
    if k is None:
        pytest.skip(f"CPU kernels unavailable here: {why}")
    return k


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """cpu_kernels() forgets its cached result and builds into an empty cache folder; restored after."""
    monkeypatch.setenv("LORA_SERVE_CACHE", str(tmp_path))
    ck._load.cache_clear()
    yield tmp_path
    ck._load.cache_clear()


def ref_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("m", [1, 3, 4, 5, 33, 128])
@pytest.mark.parametrize("n,k", [(960, 576), (7, 1536), (33, 20)])  # odd N; K not a multiple of 8
def test_linear_matches_float64(kernels, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = kernels.linear(x, w)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref_linear(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


def test_linear_reads_strided_rows_and_adds_bias(kernels):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 100, generator=g)
    x = wide[:, 10:74]  # rows of stride 100
    w, b = torch.randn(9, 64, generator=g), torch.randn(9, generator=g)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_its_batch(kernels):
    """One fixed order per output element: row i alone, in a batch of 4, or of 37 gives the same bits."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 576, generator=g), torch.randn(130, 576, generator=g)
    full = kernels.linear(x, w)
    for i in (0, 3, 5, 36):
        assert torch.equal(kernels.linear(x[i : i + 1], w), full[i : i + 1])
    assert torch.equal(kernels.linear(x[4:8], w), full[4:8])


def test_linear_refuses_what_it_cannot_read(kernels):
    with pytest.raises(ValueError):
        kernels.linear(torch.randn(2, 8).t(), torch.randn(4, 2))  # columns not contiguous
    with pytest.raises(ValueError):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 8).half())


@pytest.mark.parametrize("groups,m,r", [(1, 1, 16), (1, 5, 12), (7, 1, 8), (3, 4, 4), (2, 2, 48)])
def test_shrink_and_expand_match_float64(kernels, groups, m, r):
    g = torch.Generator().manual_seed(groups * 100 + m * 10 + r)
    k, o = 72, 40
    x = torch.randn(groups * m, k, generator=g)
    A = (torch.randn(groups, r, k, generator=g) / 8).half()
    B = (torch.randn(groups, o, r, generator=g) / 8).half()
    xa = kernels.shrink(x, A, m)  # [G * m, r]
    want = torch.einsum("gmk,grk->gmr", x.double().view(groups, m, k), A.double()).reshape(groups * m, r)
    torch.testing.assert_close(xa.double(), want, rtol=1e-5, atol=1e-5)
    y = torch.randn(groups * m, o + 6, generator=g)  # expand adds into a column slice of a wider output
    before = y.clone()
    kernels.expand_add(xa, B, y[:, 3 : 3 + o], m)
    delta = torch.einsum("gmr,gor->gmo", xa.double().view(groups, m, r), B.double()).reshape(groups * m, o)
    torch.testing.assert_close(y[:, 3 : 3 + o].double(), before[:, 3 : 3 + o].double() + delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :3], before[:, :3]) and torch.equal(y[:, 3 + o :], before[:, 3 + o :])


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
