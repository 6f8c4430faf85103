"""The step sizes the CPU kernels take for the base's matmuls: measured on this machine, cached, obeyed (model/kernel_rows.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.model import kernel_rows
from lora_serve.model.kernel_rows import ALL_BUCKETS, bucket_of, kernel_buckets
from lora_serve.model.linear import linear


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_SERVE_CACHE", str(tmp_path))
    return tmp_path


def test_a_step_falls_in_the_next_power_of_two_and_past_64_rows_in_none():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_of(65) not in ALL_BUCKETS


class CountingKernels:
    """Stands in for CPUKernels where only the route matters: records the rows it was given."""

    def __init__(self):
        self.rows: list[int] = []

    def linear(self, x, w, bias=None):
        self.rows.append(x.shape[0])
        return torch.nn.functional.linear(x, w, bias)


def test_linear_sends_only_the_chosen_buckets_to_the_kernels():
    spy, w = CountingKernels(), torch.randn(16, 8)
    for rows in (1, 5, 8, 9, 16, 64, 65):
        y = linear(torch.randn(rows, 8), w, None, spy, frozenset({8, 64}))  # type: ignore[arg-type]
        assert y.shape == (rows, 16)
    assert spy.rows == [5, 8, 64]  # buckets 8, 8 and 64; 1, 9 (16), 16 and 65 (past 64) on torch


def test_the_choice_is_the_measured_winners_and_is_measured_once(kernels, fresh_cache, monkeypatch):
    weights = [torch.randn(96, 64), torch.randn(64, 96)]
    measured = {n: (1.0, 0.5 if n in (4, 8) else 2.0) for n in ALL_BUCKETS}  # (torch ms, kernels ms)
    calls = []
    monkeypatch.setattr(kernel_rows, "measure", lambda w, k: calls.append(1) or measured)
    assert kernel_buckets(weights, kernels) == {4, 8}
    assert kernel_buckets(weights, kernels) == {4, 8} and len(calls) == 1  # the second start reads the cache
    (cached,) = (fresh_cache / "kernels").glob("rows_*.json")
    assert json.loads(cached.read_text())["kernel_buckets"] == [4, 8]
    assert kernel_buckets([torch.randn(32, 64)], kernels) == {4, 8} and len(calls) == 2  # other shapes: measured anew


def test_measure_times_both_sides_for_each_bucket(kernels):
    times = kernel_rows.measure([torch.randn(64, 32)], kernels, rows=(1, 8), repeats=1)
    assert sorted(times) == [1, 8] and all(t > 0 and k > 0 for t, k in times.values())


def test_the_engine_measures_under_auto_and_takes_every_bucket_under_on(tiny_llama_dir, kernels, fresh_cache):
    def engine(mode: str) -> LLMEngine:
        config = EngineConfig(
            model=ModelConfig(cpu_kernels=mode),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(max_model_len=64),
            cache=CacheConfig(kv_cache_memory_gb=0.01),
        )
        return LLMEngine.from_config(config, tiny_llama_dir)

    auto = engine("auto")
    (cached,) = (fresh_cache / "kernels").glob("rows_*.json")
    chosen = frozenset(json.loads(cached.read_text())["kernel_buckets"])
    assert auto.model.kernel_buckets == chosen
    assert all(m.kernel_buckets == chosen for m in auto.model.linears().values())
    assert engine("on").model.kernel_buckets == ALL_BUCKETS
