"""The resolve step (engine/resolve.py): every "auto" and unset field made concrete once, the result logged once."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_serve.bench.llama_shapes import arch_of
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine import resolve
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.resolve import describe, resolve_config, resolve_lora_backend, resolve_lora_dtype
from lora_serve.lora.budget import GIB, LoRAMemory
from lora_serve.model.default_model import cache_root
from lora_serve.model.loader import random_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: no GPU is touched
ARCH = arch_of("tiny")  # 512 positions
SMALL_CACHE = CacheConfig(kv_cache_memory_gb=0.01)


@pytest.fixture(autouse=True)
def cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve as this CPU machine does, wherever the suite runs: no CUDA, the CPU kernels built (a test
    may take them away), no triton interpreter unless a test sets it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(resolve, "cpu_kernels", lambda: (object(), ""))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve, "cpu_kernels", lambda: (None, "no C compiler (cc or gcc) on PATH"))


def config(model: dict | None = None, scheduler: dict | None = None, lora: dict | None = None) -> EngineConfig:
    return EngineConfig(model=ModelConfig(**model or {}), scheduler=SchedulerConfig(**scheduler or {}), lora=LoRAConfig(**lora or {}))


def test_auto_resolves_for_this_cpu_machine_and_model() -> None:
    got = resolve_config(EngineConfig(), ARCH)
    assert (got.model.device, got.model.dtype) == ("cpu", "float32")
    assert got.model.cpu_kernels == "on"
    assert (got.lora.lora_dtype, got.lora.lora_backend, got.lora.lora_memory_gb) == ("float16", "torch", 4.0)  # read by the kernels
    assert got.lora.adapter_dir == cache_root() / "adapters"
    assert (got.scheduler.max_model_len, got.scheduler.max_num_batched_tokens) == (512, 2048)
    assert describe(got) == (
        f"device=cpu dtype=float32 cpu_kernels=on (built) quantization=none lora_dtype=float16 lora_backend=torch (CPU) lora_memory_gb=4.00 "
        f"adapter_dir={cache_root() / 'adapters'} max_model_len=512 max_num_batched_tokens=2048 max_prefill_stall=2.0"
    )


def test_without_the_cpu_kernels_auto_keeps_torch_and_float32_adapters_and_says_why(no_compiler) -> None:
    got = resolve_config(EngineConfig(), ARCH)
    assert (got.model.cpu_kernels, got.lora.lora_dtype) == ("off", "float32")
    assert "cpu_kernels=off (no C compiler (cc or gcc) on PATH: torch's matmuls, slower for small batches)" in describe(got)
    assert resolve_config(got, ARCH) == got
    with pytest.raises(ValueError, match="cpu_kernels=on was asked for but no C compiler"):
        resolve_config(config(model=dict(cpu_kernels="on")), ARCH)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(cpu_kernels="off"), ("off", "asked for")),
        (dict(dtype="bfloat16"), ("off", "not a float32 CPU model")),  # the kernels read float32 activations
    ],
)
def test_cpu_kernels_off_where_asked_for_or_not_float32(fields: dict, expected: tuple[str, str]) -> None:
    got = resolve_config(config(model=fields), ARCH)
    assert (got.model.cpu_kernels, got.lora.lora_dtype) == (expected[0], "float32")
    assert f"cpu_kernels={expected[0]} ({expected[1]})" in describe(got)


def test_cpu_kernels_on_a_bfloat16_model_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_kernels=on needs device=cpu and dtype=float32"):
        resolve_config(config(model=dict(cpu_kernels="on", dtype="bfloat16")), ARCH)


def test_explicit_values_pass_through_unchanged(tmp_path: Path) -> None:
    explicit = config(
        model=dict(device="cpu", dtype="bfloat16", cpu_kernels="off"),
        scheduler=dict(max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8),  # past the arch's 512: the model is built for it
        lora=dict(lora_dtype="float16", lora_backend="torch", lora_memory_gb=0.5, adapter_dir=tmp_path, adapter_cache_dir=tmp_path / "s3"),
    )
    assert resolve_config(explicit, ARCH) == explicit


@pytest.mark.parametrize(
    "fields",
    [
        {},
        dict(model=dict(dtype="bfloat16")),
        dict(lora=dict(lora_dtype="bfloat16", lora_memory_gb=1.5)),
        dict(scheduler=dict(max_model_len=128, max_num_seqs=4)),
    ],
    ids=["defaults", "bf16 base", "bf16 slots", "short context"],
)
def test_resolving_twice_gives_the_same_config_before_and_after_loading(fields: dict) -> None:
    once = resolve_config(config(**fields), ARCH)
    assert resolve_config(once, ARCH) == once
    model = random_model(ARCH, getattr(torch, once.model.dtype), CPU, once.scheduler.max_model_len or 0)
    assert resolve_config(once, model) == once


def test_a_built_model_gives_its_device_dtype_and_positions() -> None:
    model = random_model(ARCH, torch.bfloat16, CPU, 64)
    got = resolve_config(EngineConfig(), model)
    assert (got.model.device, got.model.dtype, got.scheduler.max_model_len) == ("cpu", "bfloat16", 64)
    assert got.lora.lora_dtype == "float32"  # small bf16 matmuls are slow on CPU


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(model=dict(dtype="float16")), "dtype=float16 but the model was built with dtype bfloat16"),
        (dict(scheduler=dict(max_model_len=128)), r"max_model_len \(128\) exceeds the 64 positions"),
        (dict(scheduler=dict(max_num_seqs=32, max_num_batched_tokens=16)), r"max_num_batched_tokens \(16\) must be >= max_num_seqs"),
        (dict(lora=dict(lora_backend="triton")), "lora_backend=triton needs a CUDA device"),
    ],
    ids=["dtype disagrees", "context too long", "batch below seqs", "triton on cpu"],
)
def test_what_cannot_run_is_refused_at_resolve_time(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config(config(**fields), random_model(ARCH, torch.bfloat16, CPU, 64))


def test_device_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="device=cuda requested but torch sees no CUDA device"):
        resolve_config(config(model=dict(device="cuda")), ARCH)


@pytest.mark.parametrize(
    ("name", "device", "base", "expected"),
    [
        ("auto", CPU, torch.float32, torch.float32),  # without the CPU kernels
        ("auto", CPU, torch.bfloat16, torch.float32),  # small bf16 matmuls are slow on CPU
        ("auto", CUDA, torch.bfloat16, torch.bfloat16),
        ("auto", CUDA, torch.float16, torch.float16),
        ("auto", CUDA, torch.float32, torch.float32),
        ("float32", CUDA, torch.bfloat16, torch.float32),
        ("bfloat16", CPU, torch.float32, torch.bfloat16),
        ("float16", CUDA, torch.bfloat16, torch.float16),
    ],
)
def test_lora_dtype_resolves_per_device_and_base(name, device, base, expected) -> None:
    assert resolve_lora_dtype(name, device, base) == expected


def test_with_the_cpu_kernels_auto_adapters_are_float16_and_explicit_ones_stay() -> None:
    assert resolve_lora_dtype("auto", CPU, torch.float32, cpu_kernels_on=True) == torch.float16
    assert resolve_lora_dtype("float32", CPU, torch.float32, cpu_kernels_on=True) == torch.float32


@pytest.fixture
def triton_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve, "triton_batch_class", lambda: (None, "triton does not import (no module named 'triton')"))


@pytest.fixture
def triton_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve, "triton_batch_class", lambda: (object, ""))


@pytest.mark.parametrize(
    ("name", "device", "triton", "interpret", "expected"),
    [
        ("auto", CPU, "triton_present", True, ("torch", "CPU")),  # the interpreter only when asked for
        ("torch", CPU, "triton_present", False, ("torch", "CPU")),
        ("triton", CPU, "triton_present", True, ("triton", "interpreter")),
        ("auto", CUDA, "triton_present", False, ("triton", "CUDA")),
        ("auto", CUDA, "triton_missing", False, ("torch", "triton does not import (no module named 'triton')")),
        ("torch", CUDA, "triton_missing", False, ("torch", "triton does not import (no module named 'triton')")),
        ("torch", CUDA, "triton_present", False, ("torch", "asked for")),
        ("triton", CUDA, "triton_present", False, ("triton", "CUDA")),
    ],
)
def test_lora_backend_and_why_resolve_to_themselves(request, monkeypatch, name, device, triton, interpret, expected) -> None:
    request.getfixturevalue(triton)
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_lora_backend(name, device) == expected
    assert resolve_lora_backend(expected[0], device) == expected


@pytest.mark.parametrize(
    ("device", "message"),
    [(CPU, "needs a CUDA device"), (CUDA, "was asked for but triton does not import")],
    ids=["cpu-without-interpreter", "cuda-without-triton"],
)
def test_asking_for_triton_where_it_cannot_run_is_an_error(triton_missing, device, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_lora_backend("triton", device)


@pytest.mark.parametrize("total_memory", [80 * GIB, 143_771_336_704, 24_000_000_001], ids=["80 GiB", "H200", "odd"])
def test_the_cuda_budget_is_a_tenth_of_the_gpu_to_the_byte(monkeypatch, total_memory: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_memory))
    gb = resolve.default_lora_memory_gb(CUDA)
    model = random_model(ARCH, torch.float32, CPU, 64)  # only its shape is read
    memory = LoRAMemory.of(LoRAConfig(lora_memory_gb=gb), model, torch.bfloat16)
    assert memory.budget_bytes == int(0.10 * total_memory)


def resolved_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolved config: ")]


def test_the_resolved_config_is_logged_once_per_engine_start(tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lora_serve"):
        engine = LLMEngine.from_config(EngineConfig(cache=SMALL_CACHE), tiny_llama_dir)
    assert resolved_lines(caplog) == [f"resolved config: {describe(engine.config)}"]
    assert "lora_backend=torch (CPU) lora_memory_gb=4.00" in resolved_lines(caplog)[0]
    assert sum(r.getMessage().startswith("LoRA memory: 4.00 GiB") for r in caplog.records) == 1
    assert resolve_config(engine.config, engine.model) == engine.config
    assert engine.lora.slot_dtype == torch.float16 and engine.adapters.adapter_dir == cache_root() / "adapters"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_serve"):
        built = LLMEngine(random_model(ARCH, torch.bfloat16, CPU, 64), None, EngineConfig(cache=SMALL_CACHE))
    assert resolved_lines(caplog) == [f"resolved config: {describe(built.config)}"]
    assert (built.config.model.dtype, built.max_model_len, built.max_num_batched_tokens) == ("bfloat16", 64, 2048)
