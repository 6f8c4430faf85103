"""The step sizes the CPU kernels take for the base's matmuls: measured on this machine, cached, obeyed (model/kernel_rows.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lora_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lora_serve.engine import llm_engine
from lora_serve.engine.intra_op import run_on_own_thread
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


class InterruptedKernels:
    """F.linear, but two of its three timed passes take 50 ms more, as when other work takes the CPUs."""

    def __init__(self):
        self.calls = 0

    def linear(self, x, w, bias=None):
        self.calls += 1
        if self.calls in (2, 3):  # call 1 is the warm-up pass
            time.sleep(0.05)
        return torch.nn.functional.linear(x, w, bias)


def test_a_side_counts_its_fastest_pass_so_busy_moments_do_not_decide():
    times = kernel_rows.measure([torch.randn(64, 32)], InterruptedKernels(), rows=(1,), repeats=3)  # type: ignore[arg-type]
    assert times[1][1] < 25, times  # a median of the three would be >= 50 ms


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


def test_the_engine_measures_at_the_count_it_steps_with_not_the_callers(tiny_llama_dir, kernels, fresh_cache, monkeypatch):
    """A process's second engine may be built on a thread whose count is not the steps' (a test session,
    or a thread new to torch after the first engine's claim left the default at one)."""
    counts = []
    monkeypatch.setattr(kernel_rows, "measure", lambda w, k: counts.append(torch.get_num_threads()) or {n: (1.0, 0.5) for n in ALL_BUCKETS})
    monkeypatch.setattr(llm_engine, "default_num_threads", lambda: 2)  # the steps' count, as before any claim
    default = run_on_own_thread(torch.get_num_threads, "lora-serve-test")
    config = EngineConfig(scheduler=SchedulerConfig(max_model_len=64), cache=CacheConfig(kv_cache_memory_gb=0.01))

    def build_on_one_thread() -> int:
        torch.set_num_threads(1)
        return LLMEngine.from_config(config, tiny_llama_dir).num_threads

    try:
        assert run_on_own_thread(build_on_one_thread, "lora-serve-test") == 2
    finally:
        run_on_own_thread(lambda: torch.set_num_threads(default), "lora-serve-test")
    assert counts == [2]
