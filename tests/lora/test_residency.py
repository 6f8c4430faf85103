"""Device residency in a byte budget: exact ranks, LRU eviction among unpinned adapters, pins held.

The adapters of test_manager.py have ranks 4, 6, ..., 14 on every projection, so each takes a
different number of bytes; bfloat16 slots on CPU take the copied path CUDA takes (one device
buffer per adapter), float32 slots on CPU share the CPU tier's copies, whose bytes the budget bounds.
"""

from __future__ import annotations

import pytest

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.lora.errors import AdapterTooLargeError
from lora_serve.lora.residency import PreparedEntries
from lora_serve.model.cpu_kernels import cpu_kernels

from ..engine.helpers import run_to_completion
from .test_manager import NAMES, PROMPT, adapter_paths, alone, greedy  # noqa: F401 (fixtures)

GIB = 2**30


def make(tiny_llama_dir, adapter_paths, budget_bytes: int, lora_dtype: str, names=NAMES) -> LLMEngine:  # noqa: F811
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256),
        lora=LoRAConfig(lora_memory_gb=budget_bytes / GIB, max_lora_rank=16, lora_dtype=lora_dtype,
                        lora_modules=[f"{n}={adapter_paths[n]}" for n in names]),
    )  # fmt: skip
    return LLMEngine.from_config(config, tiny_llama_dir)


def sizes(tiny_llama_dir, adapter_paths) -> dict[str, int]:  # noqa: F811
    """Each adapter's bytes in bfloat16 slots: its exact ranks' A and B."""
    engine = make(tiny_llama_dir, adapter_paths, GIB, "bfloat16")
    return {n: engine.lora.adapter_bytes(n) for n in NAMES}


def test_mixed_ranks_take_their_own_bytes_and_the_lru_unpinned_ones_make_room(tiny_llama_dir, adapter_paths):  # noqa: F811
    size = sizes(tiny_llama_dir, adapter_paths)
    assert len(set(size.values())) == len(NAMES)  # mixed ranks: no two the same size
    engine = make(tiny_llama_dir, adapter_paths, size["a0"] + size["a1"] + size["a2"], "bfloat16")
    lora, residency = engine.adapters, engine.lora.residency

    def pin(name):
        lora.acquire(name)
        return residency.pin(name, lora._cpu[name], lora.registry.get(name))

    held = pin("a0")  # stays pinned throughout
    for name in ("a1", "a2"):
        assert pin(name) is not None
        residency.unpin(name)
    assert residency.names() == ["a0", "a1", "a2"]
    assert residency.bytes_used == size["a0"] + size["a1"] + size["a2"]  # exactly the ranks', nothing padded

    # a3 (rank 10) needs more than a1 (rank 6) frees: a1, then a2 go, least recently used first; a0 is pinned.
    assert pin("a3") is not None
    assert residency.names() == ["a0", "a3"]
    assert residency.bytes_used == size["a0"] + size["a3"] <= residency.budget_bytes
    # With a0 and a3 pinned, a5 cannot get room: it waits (None) and nothing is evicted.
    assert pin("a5") is None
    assert residency.names() == ["a0", "a3"] and held is not None
    residency.unpin("a3")
    assert pin("a5") is not None and residency.names() == ["a0", "a5"]


def test_an_engine_under_a_tight_budget_gives_every_adapter_its_own_tokens(tiny_llama_dir, adapter_paths):  # noqa: F811
    size = sizes(tiny_llama_dir, adapter_paths)
    roomy = make(tiny_llama_dir, adapter_paths, GIB, "bfloat16")
    tight = make(tiny_llama_dir, adapter_paths, size["a4"] + size["a5"], "bfloat16")
    requests = {f"r{i}": (PROMPT, greedy(8)) for i in range(12)}
    loras = {f"r{i}": NAMES[i % len(NAMES)] for i in range(12)}
    assert run_to_completion(tight, requests, loras) == run_to_completion(roomy, requests, loras)
    assert tight.lora.residency.bytes_used <= size["a4"] + size["a5"] and tight.lora.residency.num_evictions > 0


def test_on_cpu_the_budget_bounds_the_shared_cpu_copies(tiny_llama_dir, adapter_paths, alone):  # noqa: F811
    fp32 = {n: 2 * b for n, b in sizes(tiny_llama_dir, adapter_paths).items()}
    engine = make(tiny_llama_dir, adapter_paths, fp32["a4"] + fp32["a5"], "float32")
    assert engine.lora.residency.shared
    for name in NAMES:
        assert run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": name})["r"]["tokens"] == alone[name]
    assert [n for n in NAMES if engine.adapters.location(n) != "disk"] == ["a4", "a5"]
    assert engine.adapters.num_evictions >= len(NAMES) - 2


@pytest.mark.parametrize("lora_dtype", ["auto", "float32"])  # float16 read by the CPU kernels where they build; torch's float32
def test_a_shared_copy_is_made_resident_from_the_entries_built_as_it_was_loaded(tiny_llama_dir, adapter_paths, alone, lora_dtype):  # noqa: F811
    engine = make(tiny_llama_dir, adapter_paths, GIB, lora_dtype)
    residency = engine.lora.residency
    assert residency.shared
    copy = engine.adapters.cpu_copy("a2")
    assert isinstance(copy.prepared, PreparedEntries) and copy.prepared.weights is copy.weights
    assert len(copy.prepared.entries) == len(residency.projections) and all(copy.prepared.entries)  # every projection targeted
    assert run_to_completion(engine, {"r": (PROMPT, greedy(12))}, {"r": "a2"})["r"]["tokens"] == alone["a2"]
    slot = residency._resident["a2"].slot
    kernels = lora_dtype == "auto" and cpu_kernels()[0] is not None
    assert all((slots.kernel_table is not None) == kernels for _, _, slots in residency.projections)
    for (_, _, slots), entry in zip(residency.projections, copy.prepared.entries):
        assert slots.entries[slot] is entry  # pointed at, not built again
        if slots.kernel_table is not None:
            assert entry is not None and slots.kernel_table._keep[slot] is entry.kernel_rows


def test_an_adapter_larger_than_the_budget_is_refused_at_registration(tiny_llama_dir, adapter_paths):  # noqa: F811
    fp32 = {n: 2 * b for n, b in sizes(tiny_llama_dir, adapter_paths).items()}
    with pytest.raises(AdapterTooLargeError, match="lora_memory_gb"):
        make(tiny_llama_dir, adapter_paths, fp32["a5"] - 1, "float32", names=["a5"])


def test_the_logged_reference_adapter_is_a_real_rank_16_adapter_on_every_projection(tiny_llama_dir, tmp_path):
    from lora_serve.bench.random_adapters import write_random_adapter
    from lora_serve.model.arch import ModelArch

    path = write_random_adapter(tmp_path / "r16", ModelArch.from_dir(tiny_llama_dir), rank=16, seed=0)
    engine = make(tiny_llama_dir, {"r16": path}, GIB, "auto", names=["r16"])
    assert engine.lora.memory.reference_bytes == engine.lora.adapter_bytes("r16")  # in the resolved slot dtype
