"""Weight-only quantized weights (model/quantized_weight.py): the quantization error each scheme promises,
the CPU kernels (linear_q8, linear_q4) against F.linear on the dequantized weight in float64, and a
model quantized in place."""

from __future__ import annotations

import pytest
import torch

from lora_serve.bench.llama_shapes import arch_of
from lora_serve.model.loader import random_model
from lora_serve.model.quantized_weight import KERNEL_MAX_ROWS, Int4Weight, Int8Weight, QuantizedWeight, quantize_weight

SCHEMES = {"int8": Int8Weight, "int4": Int4Weight}


def ref(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    return (x.double() @ w.dequantize().double().t()).float()


def test_int8_is_within_half_a_step_of_each_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 200, generator=g) * torch.rand(64, 1, generator=g) * 4  # channels of different ranges
    q = Int8Weight(w)
    step = w.abs().amax(dim=1) / 127
    assert ((q.dequantize() - w).abs() <= step[:, None] / 2 + 1e-6).all()
    assert (q.q.abs() <= 127).all() and q.q.dtype == torch.int8


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_is_within_half_a_step_of_each_group_and_keeps_its_ends(group_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 192, generator=g)
    q = Int4Weight(w, group_size)
    groups, back = w.view(48, -1, group_size), q.dequantize().view(48, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    assert ((back - groups).abs() <= step[..., None] / 2 + 1e-5).all()
    torch.testing.assert_close(back.amin(-1), groups.amin(-1))  # the minimum is stored exactly
    assert q.packed.shape == (48, 96) and q.scales.shape == (48, 192 // group_size)


def test_constant_and_zero_rows_dequantize_exactly() -> None:
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for scheme in SCHEMES.values():
        assert torch.equal(scheme(w).dequantize()[0], w[0])
    assert torch.equal(Int4Weight(w).dequantize(), w)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, KERNEL_MAX_ROWS])
@pytest.mark.parametrize("n,k", [(960, 576), (7, 1536), (33, 64)])
def test_kernels_match_the_dequantized_weight(kernels, scheme: str, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    w = quantize_weight(torch.randn(n, k, generator=g), scheme)  # type: ignore[arg-type]
    x = torch.randn(m, k, generator=g)
    y = w.matmul(x, kernels)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("k", [1536, 584, 21])  # K: runs of 16; one run of 8 past them; and a scalar tail
def test_int8_kernel_gives_a_row_the_same_bits_alone_in_any_batch_and_on_either_isa(kernels, k: int) -> None:
    """The AVX-512 path (tiles of 8 rows, 16 lanes) sums as the AVX2 one (tiles of 4, two 8-lane chains)."""
    g = torch.Generator().manual_seed(k)
    w, x = Int8Weight(torch.randn(37, k, generator=g)), torch.randn(19, k, generator=g)
    full = kernels.linear_q8(x, w.q, w.scales)
    assert torch.equal(kernels.linear_q8(x, w.q, w.scales, isa="avx2"), full)
    for lo, hi in ((0, 1), (5, 6), (3, 11), (8, 16), (11, 19)):
        assert torch.equal(kernels.linear_q8(x[lo:hi], w.q, w.scales), full[lo:hi])
    torch.testing.assert_close(full, ref(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_gives_a_row_the_same_bits_alone_in_any_batch_and_on_either_isa(kernels, group_size: int) -> None:
    """The AVX-512 path (tiles of 8 rows, 16 lanes) sums as the AVX2 one (tiles of 4, two 8-lane chains)."""
    g = torch.Generator().manual_seed(group_size)
    w, x = Int4Weight(torch.randn(37, 576, generator=g), group_size), torch.randn(19, 576, generator=g)
    full = kernels.linear_q4(x, w.packed, w.scales, w.mins)
    assert torch.equal(kernels.linear_q4(x, w.packed, w.scales, w.mins, isa="avx2"), full)
    for lo, hi in ((0, 1), (5, 6), (3, 11), (8, 16), (11, 19)):
        assert torch.equal(kernels.linear_q4(x[lo:hi], w.packed, w.scales, w.mins), full[lo:hi])
    torch.testing.assert_close(full, ref(x, w), rtol=1e-5, atol=1e-4 * 576**0.5)


def test_int8_kernel_takes_an_input_size_that_is_no_multiple_of_8(kernels) -> None:
    g = torch.Generator().manual_seed(2)
    w, x = Int8Weight(torch.randn(9, 21, generator=g)), torch.randn(6, 21, generator=g)
    torch.testing.assert_close(w.matmul(x, kernels), ref(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_strided_rows_large_steps_and_no_kernels_all_give_the_dequantized_product(kernels, scheme: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = quantize_weight(torch.randn(40, 128, generator=g), scheme)  # type: ignore[arg-type]
    wide = torch.randn(5, 300, generator=g)
    x = wide[:, 100:228]  # rows of stride 300
    torch.testing.assert_close(w.matmul(x, kernels), ref(x, w), rtol=1e-5, atol=1e-3)
    big = torch.randn(KERNEL_MAX_ROWS + 1, 128, generator=g)  # past the kernels: dequantize + F.linear
    torch.testing.assert_close(w.matmul(big, kernels), ref(big, w), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(w.matmul(x, None), ref(x, w), rtol=1e-5, atol=1e-3)
    assert w.matmul(x.bfloat16(), kernels).dtype == torch.bfloat16


@pytest.mark.parametrize("k", [48, 100])
def test_int4_refuses_an_input_size_its_groups_do_not_divide(k: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight(torch.randn(8, k))


def test_kernels_refuse_operands_of_the_wrong_kind(kernels) -> None:
    w = Int8Weight(torch.randn(8, 64))
    with pytest.raises(ValueError, match="linear_q8"):
        kernels.linear_q8(torch.randn(2, 32), w.q, w.scales)
    with pytest.raises(ValueError, match="float32"):
        kernels.linear_q8(torch.randn(2, 64, dtype=torch.float64), w.q, w.scales)
    w4 = Int4Weight(torch.randn(8, 64))
    with pytest.raises(ValueError, match="linear_q4"):
        kernels.linear_q4(torch.randn(2, 64), w4.packed[:, :16], w4.scales, w4.mins)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_quantized_model_keeps_its_shapes_and_float_embedding(scheme: str) -> None:
    model = random_model(arch_of("tiny"), torch.float32, torch.device("cpu"), 64)
    float_bytes = sum(w.numel() * 4 for w in model.step_weights())
    num_params = model.num_params()
    embedding = model.embed_tokens.weight.clone()
    heads = model.lm_head_weight.clone()
    shapes = {name: lin.out_features for name, lin in model.linears().items()}
    model.quantize(scheme)  # type: ignore[arg-type]
    assert model.quantization == scheme
    assert {name: lin.out_features for name, lin in model.linears().items()} == shapes
    assert all(isinstance(lin.weight, QuantizedWeight) for lin in model.linears().values())
    assert isinstance(model.lm_head_weight, QuantizedWeight)
    assert torch.equal(model.embed_tokens.weight, embedding)
    assert (model.lm_head_weight.dequantize() - heads).abs().max() > 0  # quantized, not the float copy
    assert model.num_params() == num_params
    quantized_bytes = sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedWeight))
    assert quantized_bytes < float_bytes / (3.5 if scheme == "int8" else 5)  # scales: 4 bytes a row (int8), 8 a group (int4)
    with pytest.raises(ValueError, match="quantized"):
        model.step_weights()
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int8")


@pytest.mark.parametrize("group_size", [64, 192])
def test_int4_kernel_takes_groups_of_several_runs_of_32(kernels, group_size: int) -> None:
    g = torch.Generator().manual_seed(4)
    w, x = Int4Weight(torch.randn(50, 576, generator=g), group_size), torch.randn(5, 576, generator=g)
    assert w.group_size == group_size
    torch.testing.assert_close(w.matmul(x, kernels), ref(x, w), rtol=1e-5, atol=1e-4 * 576**0.5)
