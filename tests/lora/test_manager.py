"""The two cache tiers: CPU copies and device residency (LRU), pins, waiting for room, deletion with requests in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.errors import AdapterBusyError, AdapterNotFoundError, InvalidAdapterError
from lora_serve.model.arch import ModelArch

from ..engine.helpers import run_to_completion

NAMES = [f"a{i}" for i in range(6)]


@pytest.fixture(scope="module")
def adapter_paths(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    arch = ModelArch.from_dir(tiny_llama_dir)
    out = tmp_path_factory.mktemp("adapters")
    # Large B so every adapter visibly changes the tiny model's greedy tokens.
    return {n: write_random_adapter(out / n, arch, rank=4 + 2 * i, seed=i, alpha=64.0) for i, n in enumerate(NAMES)}


def make(tiny_llama_dir, adapter_paths, max_loras: int, max_cpu_loras: int, lora_dtype: str = "auto", **sched) -> LLMEngine:
    modules = [f"{n}={p}" for n, p in adapter_paths.items()]
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256, **sched),
        lora=LoRAConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=16, lora_modules=modules, lora_dtype=lora_dtype),
    )
    return LLMEngine.from_config(config, tiny_llama_dir)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


PROMPT = list(range(500, 530))


@pytest.fixture(scope="module")
def alone(tiny_llama_dir, adapter_paths) -> dict[str | None, list[int]]:
    """Each adapter's tokens with room for all of them (the reference for the tight engines below)."""
    engine = make(tiny_llama_dir, adapter_paths, max_loras=6, max_cpu_loras=6)
    out = {name: run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": name})["r"]["tokens"] for name in [None, *NAMES]}
    assert len({tuple(t) for t in out.values()}) == len(out)  # every adapter really differs
    return out


def test_cpu_copies_are_lru_and_bounded_and_read_in_place_on_cpu(tiny_llama_dir, adapter_paths, alone):
    engine = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=3)
    for name in NAMES:
        assert run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": name})["r"]["tokens"] == alone[name]
    locations = {n: engine.adapters.location(n) for n in NAMES}
    # On CPU (float32, or float16 with the CPU kernels) the slots share the CPU tier's copies: what is in
    # CPU memory is what the matmuls read.
    assert [n for n, loc in locations.items() if loc == "device"] == ["a3", "a4", "a5"]
    assert engine.lora.residency.bytes_used == 0  # no second copy
    assert engine.lora.residency.names() == ["a4", "a5"]  # max_loras of the CPU copies, viewed in place
    # Coming back to an evicted adapter gives the same tokens (A, then others, then A again).
    assert run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": "a0"})["r"]["tokens"] == alone["a0"]


def test_device_copies_are_lru_within_max_loras(tiny_llama_dir, adapter_paths):
    # bfloat16 slots on CPU take the copied path CUDA takes: one buffer per resident adapter.
    engine = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=3, lora_dtype="bfloat16")
    first = {name: run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": name})["r"]["tokens"] for name in NAMES}
    assert engine.lora.residency.names() == ["a4", "a5"]
    assert [n for n in NAMES if engine.adapters.location(n) == "device"] == ["a4", "a5"]
    assert engine.lora.residency.bytes_used == sum(engine.lora.adapter_bytes(n) for n in ("a4", "a5"))
    assert run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": "a0"})["r"]["tokens"] == first["a0"]
    assert engine.lora.residency.names() == ["a5", "a0"]


def test_more_adapters_than_slots_wait_and_all_finish_correctly(tiny_llama_dir, adapter_paths, alone):
    engine = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=6)
    reqs = {f"r{i}": (PROMPT, greedy(12)) for i in range(12)}
    lora = {f"r{i}": ([None, *NAMES][i % 7]) for i in range(12)}
    seen_slots: list[int] = []
    original = engine.lora.prepare

    def spy(seqs, n):
        batch = original(seqs, n)
        seen_slots.append(len({s.lora_slot for s in seqs if s.lora_slot is not None}))
        return batch

    engine.lora.prepare = spy
    outs = run_to_completion(engine, reqs, lora)
    for rid, name in lora.items():
        assert outs[rid]["tokens"] == alone[name], rid
    assert max(seen_slots) == 2  # never more adapters in a step than max_loras
    assert engine.lora.residency.num_pins() == 0 and engine.kv_cache.usage == 0.0


def test_waiting_request_is_not_starved_by_a_stream_of_resident_adapter_requests(tiny_llama_dir, adapter_paths, alone):
    engine = make(tiny_llama_dir, adapter_paths, max_loras=1, max_cpu_loras=6)
    engine.scheduler.max_lora_bypass = 4
    engine.add_request("first", PROMPT, greedy(6), "a0")
    engine.add_request("starved?", PROMPT, greedy(12), "a1")
    finished_at: dict[str, int] = {}
    for step in range(200):
        engine.add_request(f"late{step}", PROMPT, greedy(6), "a0")  # a0 stays wanted every step
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
        if "starved?" in finished_at:
            break
    assert "starved?" in finished_at and finished_at["starved?"] < 60
    for rid in list(engine._seqs):
        engine.abort_request(rid)


def test_unregister_lets_running_request_finish_then_drops_weights(tiny_llama_dir, adapter_paths, alone):
    engine = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=6)
    engine.add_request("r", PROMPT, greedy(12), "a2")
    tokens = engine.step()[0].new_token_ids
    engine.adapters.unregister("a2")
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("new", PROMPT, greedy(4), "a2")
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == alone["a2"]
    assert engine.adapters.location("a2") == "disk" and not engine.adapters.contains("a2")


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_cpu_tier_is_a_hard_bound_a_full_tier_makes_acquire_wait(tiny_llama_dir, adapter_paths):
    lora = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=3).adapters
    for name in ("a0", "a1", "a2"):  # three requests hold every CPU place
        lora.acquire(name)
    with pytest.raises(AdapterBusyError):  # the engine thread's way: no wait
        lora.acquire("a3")
    assert "a3" not in lora._refs

    results: dict[str, object] = {}

    def request(name: str, abandoned: threading.Event | None = None) -> None:
        try:
            lora.acquire(name, None, abandoned)
            results[name] = "acquired"
        except AdapterBusyError as exc:
            results[name] = exc

    waiter = threading.Thread(target=request, args=("a3",))
    waiter.start()
    _until(lambda: lora._refs.get("a3") == 1, "the waiter took its reference")
    assert "a3" not in lora._cpu and "a3" not in lora._loading  # waiting, not reading past the bound
    lora.release("a0")
    waiter.join()
    assert results["a3"] == "acquired" and list(lora._cpu) == ["a1", "a2", "a3"]

    gone = threading.Event()  # a request whose client left while it waited
    waiter = threading.Thread(target=request, args=("a4", gone))
    waiter.start()
    _until(lambda: lora._refs.get("a4") == 1, "the second waiter took its reference")
    lora.abandon(gone)
    waiter.join()
    assert isinstance(results["a4"], AdapterBusyError) and "a4" not in lora._refs
    for name in ("a1", "a2", "a3"):
        lora.release(name)
    assert lora._refs == {} and lora.peak_cpu_loras == 3


@pytest.mark.parametrize("name", [".upload-a0", "-a0"])
def test_lora_modules_with_a_bad_name_stop_the_start(tiny_llama_dir, adapter_paths, name):
    with pytest.raises(InvalidAdapterError, match="adapter name"):
        make(tiny_llama_dir, {name: adapter_paths["a0"]}, max_loras=1, max_cpu_loras=1)


@pytest.mark.parametrize(("lora_dtype", "expected"), [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_lora_dtype_reaches_the_slots_of_every_projection(tiny_llama_dir, adapter_paths, lora_dtype, expected):
    engine = make(tiny_llama_dir, adapter_paths, max_loras=2, max_cpu_loras=6, lora_dtype=lora_dtype)
    engine.add_request("r", PROMPT, greedy(12), "a3")
    engine.step()  # running: its adapter is resident and pinned
    slots = [linear.lora_slots for layer in engine.model.layers for linear in layer.linears()]
    entries = [e for s in slots for e in s.entries if e is not None]
    assert len(entries) == len(slots)  # write_random_adapter targets every projection
    assert {e.A.dtype for e in entries} | {b.dtype for e in entries for *_, b, _ in e.layout} == {expected}
    while engine.has_unfinished():
        engine.step()
