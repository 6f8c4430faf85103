"""An adapter whose update can overflow the dtype it runs in is refused at load (lora/overflow.py).

The bound is checked against PEFT's own LoRA layers: the gain it computes must bound what PEFT's
delta actually does to random inputs, and the hostile folders (finite values that overflow in use)
must be refused with a 400 while the real adapter passes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lora_serve.lora.errors import InvalidAdapterError
from lora_serve.lora.lora_model import Gain
from lora_serve.lora.overflow import check_weighted_gain, max_gain, spectral_norms
from lora_serve.lora.registry import AdapterRegistry

from .test_lora_model import V1_B, edit_config, edit_tensors, good_adapter, save_adapter  # noqa: F401
from .test_peft_config import ARCH, MAX_RANK


def registry(dtype: torch.dtype = torch.float32) -> AdapterRegistry:
    return AdapterRegistry(ARCH, MAX_RANK, "base", dtype)


def scale_all(factor: float) -> Callable[[dict], None]:
    return lambda t: t.update({k: v * factor for k, v in t.items()})


def test_max_gain_per_dtype():
    assert max_gain(torch.float32) == pytest.approx(1.8446742e19, rel=1e-6)
    assert max_gain(torch.bfloat16) == pytest.approx(1.8446742e19, rel=1e-2)
    assert max_gain(torch.float16) == pytest.approx(255.99, rel=1e-3)


# id -> (edit of a copy of a real PEFT adapter, refused in float32)
HOSTILE = {
    "lora_alpha 3e38": (edit_config(lora_alpha=3e38), True),
    "weights around 1e30": (edit_tensors(scale_all(1e15)), True),  # A and B each x1e15: delta x1e30
    "one B scaled to 1e25": (edit_tensors(lambda t: t.update({V1_B: t[V1_B] * 1e25})), True),
    "weights x1e3 (large, not overflowing)": (edit_tensors(scale_all(1e3)), False),
}


@pytest.mark.parametrize("edit, refused", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_magnitudes(edit, refused: bool, good_adapter: Path, tmp_path: Path):  # noqa: F811
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit(folder)
    if not refused:
        registry().validate("ok", folder)
        return
    with pytest.raises(InvalidAdapterError, match="can overflow float32") as info:
        registry().validate("hostile", folder)
    assert info.value.status == 400 and info.value.param == "adapter_model"


def test_float16_is_stricter(good_adapter: Path, tmp_path: Path):  # noqa: F811
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit_tensors(scale_all(30.0))(folder)  # delta x900: fine in float32, past 256 in float16
    registry(torch.float32).validate("ok", folder)
    with pytest.raises(InvalidAdapterError, match="can overflow float16"):
        registry(torch.float16).validate("ok", folder)


def test_gain_bounds_what_peft_computes(tmp_path: Path):
    """On PEFT's layers, |delta(x)| / |x| never exceeds scale·‖B‖·‖A‖ (the quantity the check bounds)."""
    model = save_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    loaded = registry().validate("a", tmp_path)
    torch.manual_seed(0)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        x = torch.randn(256, A.shape[1])
        with torch.no_grad():
            delta = module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]
        ratio = (delta.norm(dim=-1) / x.norm(dim=-1)).max()
        _, layer, _, proj = name.rsplit(".", 3)
        w = loaded.weights[(int(layer), proj)]
        gain = abs(w.scale) * torch.linalg.matrix_norm(w.B.double(), ord=2) * torch.linalg.matrix_norm(w.A.double(), ord=2)
        assert 0 < ratio <= gain * (1 + 1e-6)
        assert torch.equal(w.A, A) and torch.equal(w.B, B)


def test_spectral_norms_equal_torchs_svd_norm():
    """The batched Gram-matrix norms equal torch's SVD-based ‖·‖₂ for LoRA factors of mixed ranks, wide and
    tall, a rank-1 one, and weights near float32's largest (whose squares only float64 holds)."""
    torch.manual_seed(0)
    mats = [torch.randn(r, k) for r, k in [(16, 576), (16, 576), (8, 576), (16, 1536), (1, 64)]]
    mats += [torch.randn(o, r) for o, r in [(576, 16), (192, 16), (1536, 8), (64, 1)]]
    mats += [torch.randn(4, 32) * 1e30, torch.full((3, 5), 3e38), torch.zeros(2, 7)]
    expected = [float(torch.linalg.matrix_norm(m.double(), ord=2)) for m in mats]
    assert spectral_norms(mats) == pytest.approx(expected, rel=1e-9)


def test_weighted_gain_bounds_each_part_and_their_sum():
    """A composition's update is Σ w_i·s_i·B_i A_i: its gain is at most Σ |w_i|·gain_i, and each part's
    scale·‖B‖ is multiplied by |w_i|; negative weights count by their size."""
    limit = max_gain(torch.float16)  # 256
    g = Gain(a=2.0, b=3.0, total=6.0)
    check_weighted_gain([("a", 20.0, g), ("b", -20.0, g)], torch.float16)  # 240 <= 256
    with pytest.raises(InvalidAdapterError, match="use smaller weights") as err:
        check_weighted_gain([("a", 22.0, g), ("b", -22.0, g)], torch.float16)  # 264: each alone passes
    assert err.value.param == "adapters"
    check_weighted_gain([("a", 42.0, g)], torch.float16)  # 252
    with pytest.raises(InvalidAdapterError):
        check_weighted_gain([("a", limit / 2.5, Gain(a=0.1, b=2.5 * 1.01, total=0.1))], torch.float16)  # scale·‖B‖ past the limit
    check_weighted_gain([("a", 1e17, g)], torch.float32)  # 6e17 <= 1.8e19
