"""Loading PEFT adapter folders: real `save_pretrained` output must give exactly PEFT's tensors and
scales; malformed or hostile folders must fail with the right error class and `param`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lora_serve.lora import lora_model
from lora_serve.lora.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    UnsupportedAdapterError,
    UnsupportedMediaError,
)
from lora_serve.lora.lora_model import LoRAModel, max_header_bytes, max_tensors
from lora_serve.model import huge_pages

from .test_peft_config import ARCH, GOOD_CONFIGS, MAX_RANK, tiny_llama

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"


def save_adapter(out: Path, **lora_kwargs) -> PeftModel:
    # init_lora_weights=False: random B too, so a swapped or zeroed tensor cannot pass.
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(out)
    return model


def assert_matches_peft(loaded: LoRAModel, model: PeftModel) -> None:
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            _, layer, _, proj = name.rsplit(".", 3)
            expected[(int(layer), proj)] = module
    assert set(loaded.weights) == set(expected)
    for key, module in expected.items():
        w = loaded.weights[key]
        assert w.A.dtype == w.B.dtype == torch.float32 and w.A.is_contiguous() and w.B.is_contiguous()
        assert torch.equal(w.A, module.lora_A["default"].weight)
        assert torch.equal(w.B, module.lora_B["default"].weight)
        assert w.scale == module.scaling["default"]


LOAD_CASES = ["attention r4", "mlp r8", "all-linear", "rslora", "rank and alpha patterns", "layers_to_transform list"]


@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_matches_peft(case: str, tmp_path: Path):
    model = save_adapter(tmp_path, **GOOD_CONFIGS[case])
    assert_matches_peft(LoRAModel.load("a", tmp_path, ARCH, MAX_RANK), model)


def test_sizes_and_hash(tmp_path: Path):
    save_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    loaded = LoRAModel.load("demo", tmp_path, ARCH, MAX_RANK)
    data = (tmp_path / WEIGHTS).read_bytes()
    # per layer: q_proj A [4, 64] + B [64, 4], down_proj A [4, 128] + B [64, 4]
    assert loaded.num_params == 2 * (4 * 64 + 64 * 4 + 4 * 128 + 64 * 4)
    assert (loaded.name, loaded.num_bytes, loaded.sha256) == ("demo", len(data), hashlib.sha256(data).hexdigest())
    assert loaded.size_vs_base(1000 * loaded.num_params) == {
        "params": loaded.num_params,
        "bytes": len(data),
        "base_params": 1000 * loaded.num_params,
        "ratio": 0.001,
    }


def test_adapter_name_infix_and_half_precision(tmp_path: Path):
    model = save_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["v_proj"])
    tensors = load_file(tmp_path / WEIGHTS)
    renamed = {k.replace(".weight", ".default.weight"): v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS)
    loaded = LoRAModel.load("a", tmp_path, ARCH, MAX_RANK)
    lora_a = model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight
    assert torch.equal(loaded.weights[(1, "v_proj")].A, lora_a.to(torch.bfloat16).float())


@pytest.mark.skipif(huge_pages.thp_mode() not in ("always", "madvise"), reason="this system gives no transparent huge pages")
def test_a_large_packed_copy_lies_in_huge_pages_and_holds_the_same_weights(tmp_path: Path, monkeypatch):
    save_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    loaded = LoRAModel.load("a", tmp_path, ARCH, MAX_RANK)
    layout = [(layer, names) for layer in range(ARCH.num_layers) for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))]
    plain = loaded.packed(layout, dtype=torch.float16, b_transposed=True)  # far under HUGE_PAGE_MIN_BYTES: torch's memory
    monkeypatch.setattr(lora_model, "HUGE_PAGE_MIN_BYTES", 0)
    huge = loaded.packed(layout, dtype=torch.float16, b_transposed=True)
    assert huge.flat is not None and plain.flat is not None
    assert huge.flat.data_ptr() % huge_pages.HUGE_PAGE == 0  # huge_page_buffer starts on a 2 MiB boundary
    assert torch.equal(huge.flat, plain.flat)
    assert all(
        torch.equal(huge.weights[k].A, plain.weights[k].A) and torch.equal(huge.weights[k].B, plain.weights[k].B) for k in plain.weights
    )
    assert huge.weights[(0, "q_proj")].A.data_ptr() == huge.flat.data_ptr()  # views of the one buffer


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """r=4 on q_proj and v_proj of both layers; each bad case edits a copy."""
    out = tmp_path_factory.mktemp("good-adapter")
    save_adapter(out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return out


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def write_config(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "adapter_config.json").write_text(text)


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS)

    return apply


def edit_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / WEIGHTS
        path.write_bytes(edit(path.read_bytes()))

    return apply


def pickle_only(folder: Path) -> None:
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")


def rename(old: str, new: str) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(new, t.pop(old))


Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
V1_A = f"{PREFIX}.1.self_attn.v_proj.lora_A.weight"
V1_B = f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"
EXTRA = "base_model.model.lm_head.lora_A.weight"
K_A = f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"
FAR_A = f"{PREFIX}.7.self_attn.v_proj.lora_A.weight"


def set_value(name: str, value: float, dtype: torch.dtype = torch.float32) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[name] = t[name].to(dtype)
        t[name][0, 0] = value

    return edit


# id -> (edit of a copy of good_adapter, expected error, expected param)
BAD_FOLDERS = {
    "invalid JSON": (write_config("{not json"), InvalidAdapterError, "adapter_config"),
    "JSON array": (write_config("[]"), InvalidAdapterError, "adapter_config"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), InvalidAdapterError, "adapter_config"),
    "config r mismatch": (edit_config(r=8), InvalidAdapterError, Q_A),
    "config unsupported": (edit_config(lora_bias=True), UnsupportedAdapterError, "lora_bias"),
    "pickle only (.bin)": (pickle_only, UnsupportedMediaError, "adapter_model"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), InvalidAdapterError, "adapter_model"),
    "truncated": (edit_bytes(lambda b: b[:-100]), InvalidAdapterError, "adapter_model"),
    "shorter than 8 bytes": (edit_bytes(lambda b: b[:5]), InvalidAdapterError, "adapter_model"),
    "header length > file": (
        edit_bytes(lambda b: (len(b) * 2).to_bytes(8, "little") + b[8:]),
        InvalidAdapterError,
        "adapter_model",
    ),
    "header not JSON": (edit_bytes(lambda b: b[:8] + b"#" + b[9:]), InvalidAdapterError, "adapter_model"),
    "I32 tensor": (edit_tensors(lambda t: t.update({Q_A: t[Q_A].to(torch.int32)})), InvalidAdapterError, Q_A),
    "A wrong shape": (edit_tensors(lambda t: t.update({Q_A: t[Q_A][:, :32].contiguous()})), InvalidAdapterError, Q_A),
    "A transposed": (edit_tensors(lambda t: t.update({Q_A: t[Q_A].t().contiguous()})), InvalidAdapterError, Q_A),
    "B wrong rank": (edit_tensors(lambda t: t.update({Q_B: t[Q_B][:, :3].contiguous()})), InvalidAdapterError, Q_B),
    "missing lora_B": (edit_tensors(lambda t: t.pop(Q_B)), InvalidAdapterError, Q_B),
    "missing targeted module": (
        edit_tensors(lambda t: [t.pop(V1_A), t.pop(V1_B)]),
        InvalidAdapterError,
        V1_A,
    ),
    "extra unknown tensor": (edit_tensors(lambda t: t.update({EXTRA: t[Q_A].clone()})), InvalidAdapterError, EXTRA),
    "untargeted module": (edit_tensors(lambda t: t.update({K_A: t[Q_A].clone()})), InvalidAdapterError, K_A),
    "duplicate with infix": (
        edit_tensors(lambda t: t.update({Q_A.replace(".weight", ".default.weight"): t[Q_A].clone()})),
        InvalidAdapterError,
        None,  # whichever of the two comes second
    ),
    "NaN": (edit_tensors(set_value(Q_A, float("nan"))), InvalidAdapterError, Q_A),
    "Inf in F16": (edit_tensors(set_value(Q_B, float("inf"), torch.float16)), InvalidAdapterError, Q_B),
    "F64 overflows F32": (edit_tensors(set_value(Q_B, 1e300, torch.float64)), InvalidAdapterError, Q_B),
    "layer index too large": (edit_tensors(rename(V1_A, FAR_A)), InvalidAdapterError, FAR_A),
}


@pytest.mark.parametrize("edit, error, param", BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_bad_folder(edit: Callable[[Path], None], error: type, param: str | None, good_adapter: Path, tmp_path: Path):
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit(folder)
    with pytest.raises(error) as info:
        LoRAModel.load("bad", folder, ARCH, MAX_RANK)
    assert type(info.value) is error
    if param is not None:
        assert info.value.param == param


def with_header(header: bytes) -> Callable[[Path], None]:
    """Make the weights file [u64 length][header] with no tensor data after it."""
    return lambda folder: (folder / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header)


ENTRY = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}  # ~55 bytes of header each
NUM_TENSORS = max_tensors(ARCH)  # 28 on the tiny base (42 for DoRA): lora_A and lora_B of 7 projections x 2 layers
# id -> (weights file header, what the refusal says)
HOSTILE_HEADERS = {
    "past the size bound": (b"{}" + b" " * max_header_bytes(NUM_TENSORS), "an adapter for this base model has at most"),
    "100k entries": (json.dumps({f"t{i}": ENTRY for i in range(100_000)}).encode(), "has at most"),
    "more entries than tensors": (
        json.dumps({f"t{i}": ENTRY for i in range(NUM_TENSORS + 1)}).encode(),
        f"lists {NUM_TENSORS + 1} tensors; an adapter for this base has at most {NUM_TENSORS}",
    ),
    "nested 30k deep": (b'{"__metadata__": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deeply"),
}


@pytest.mark.parametrize("header, message", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_hostile_header_is_refused_by_its_bound(header: bytes, message: str, good_adapter: Path, tmp_path: Path):
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    with_header(header)(folder)
    with pytest.raises(InvalidAdapterError, match=message) as info:
        LoRAModel.load("bad", folder, ARCH, MAX_RANK)
    assert info.value.param == "adapter_model"


def test_pickle_only_is_415(good_adapter: Path, tmp_path: Path):
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    pickle_only(folder)
    with pytest.raises(UnsupportedMediaError, match="safetensors") as info:
        LoRAModel.load("bad", folder, ARCH, MAX_RANK)
    assert info.value.status == 415


def test_missing_folder_is_404(tmp_path: Path):
    with pytest.raises(AdapterNotFoundError) as info:
        LoRAModel.load("gone", tmp_path / "nope", ARCH, MAX_RANK)
    assert info.value.status == 404


def test_good_copy_loads(good_adapter: Path, tmp_path: Path):
    """The bad cases fail because of their edit, not because of the copy."""
    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    assert len(LoRAModel.load("ok", folder, ARCH, MAX_RANK).weights) == 4
