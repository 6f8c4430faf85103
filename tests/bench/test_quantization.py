"""`lora-serve bench quantization`: every way of a step's matmuls timed per row count (torch's weight-only
ops only where they are cheap enough), and decode tok/s per scheme per batch, on the tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_serve.bench import quantization
from lora_serve.model.cpu_kernels import CPUKernels


def test_torch_int4_layout_computes_the_same_product_as_ours(kernels: CPUKernels) -> None:
    """The torch op the bench times multiplies by the weights ours does: the comparison is like for like."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    ways = quantization.matmul_ways([w], kernels, with_torch_ops=True)
    x = {128: torch.randn(3, 128)}
    torch.testing.assert_close(ways["int4 torch op"](x)[0], ways["int4 kernels"](x)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ways["int8 torch op"](x)[0], ways["int8 kernels"](x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reports_every_way_and_scheme(tiny_llama_dir: Path, kernels: CPUKernels) -> None:
    matmuls = quantization.run_matmuls(tiny_llama_dir, [1, quantization.TORCH_OPS_MAX_ROWS + 1], repeats=1)
    assert [r["rows"] for r in matmuls] == [1, quantization.TORCH_OPS_MAX_ROWS + 1]
    assert "int4 torch op" in matmuls[0] and "int4 torch op" not in matmuls[1]
    assert all(v > 0 for r in matmuls for k, v in r.items() if k != "rows")
    decode = quantization.run_decode(tiny_llama_dir, [1, 3], prompt_len=8, decode_steps=2, repeats=1, seed=0)
    assert [r["batch"] for r in decode] == [1, 3]
    assert all(r[s] > 0 for r in decode for s in ("None", "int8", "int4"))
    text = quantization.report(matmuls, decode)
    assert "int8 kernels ms" in text and "int4 / float32" in text and text.count("\n| ") == 5  # the decode header and four rows of data
