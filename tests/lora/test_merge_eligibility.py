"""Who may change the base for everyone: the auto policy merges only adapters marked auto_merge
(no tenant's upload unless an admin marks it), and a merge and an unregister of one adapter
never interleave (either it is gone and the base unmerged, or it is merged and registered)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.errors import AdapterError, AdapterMergedError, AdapterNotFoundError
from lora_serve.lora.merge_policy import MergePolicy
from lora_serve.lora.store import OWNER_FILE
from lora_serve.model.arch import ModelArch

PROMPT = list(range(700, 710))
TENANT, SHARED, MODULE = "acme-x", "shared", "mod"


def make_engine(tiny_llama_dir: Path, tmp_path: Path, **lora) -> LLMEngine:
    """adapter_dir holds a tenant's upload (.tenant file) and an adapter of no tenant; one more from --lora-modules."""
    arch = ModelArch.from_dir(tiny_llama_dir)
    store = tmp_path / "adapters"
    for i, name in enumerate([TENANT, SHARED, MODULE]):
        folder = (tmp_path / name) if name == MODULE else (store / name)
        write_random_adapter(folder, arch, rank=4, seed=i, alpha=32.0)  # a huge delta: it visibly changes the base
    (store / TENANT / OWNER_FILE).write_text("acme")
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256),
        lora=LoRAConfig(max_loras=4, max_lora_rank=8, adapter_dir=store, lora_modules=[f"{MODULE}={tmp_path / MODULE}"], **lora),
    )
    return LLMEngine.from_config(config, tiny_llama_dir)


def auto_engine(tiny_llama_dir: Path, tmp_path: Path) -> LLMEngine:
    # Thresholds low and windows short: one step of traffic is enough for the policy to act.
    return make_engine(
        tiny_llama_dir, tmp_path, merge_policy="auto", merge_threshold=0.5, unmerge_threshold=0.2,
        merge_window_steps=2, merge_interval_steps=1,
    )  # fmt: skip


def flood(engine: LLMEngine, loras: list[str | None], steps: int) -> list[str | None]:
    """Run requests on `loras` step by step; the merged adapter after each step."""
    for i, lora in enumerate(loras):
        engine.add_request(str(i), PROMPT, greedy(steps), lora)  # ids are free again once a flood ends
    history = []
    for _ in range(steps):
        engine.step()
        history.append(engine.adapters.merged_name)
    assert not engine.has_unfinished()
    return history


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def weights(engine: LLMEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def same_weights(engine: LLMEngine, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def test_only_adapters_of_no_tenant_start_marked(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, tmp_path)
    marks = {r.name: (r.origin, r.auto_merge) for r in engine.adapters.list()}
    assert marks == {TENANT: ("adapter-dir", False), SHARED: ("adapter-dir", True), MODULE: ("lora-modules", True)}


def test_a_tenants_flooded_adapter_is_never_merged_while_an_eligible_one_is(tiny_llama_dir, tmp_path):
    engine = auto_engine(tiny_llama_dir, tmp_path)
    before = weights(engine)
    assert flood(engine, [TENANT] * 4, 8) == [None] * 8  # 100% of the tokens, every step
    assert engine.merge_policy.decisions["merge"] == 0 and same_weights(engine, before)
    assert flood(engine, [SHARED] * 3 + [TENANT], 8)[-1] == SHARED  # 75%: merged
    history = flood(engine, [TENANT] * 4, 8)  # the tenant's flood unmerges the shared one, merges nothing
    assert TENANT not in history and history[-1] is None and same_weights(engine, before)


def test_an_admins_mark_lets_the_policy_merge_a_tenants_adapter_and_unmarking_stops_it(tiny_llama_dir, tmp_path):
    engine = auto_engine(tiny_llama_dir, tmp_path)
    assert engine.adapters.set_auto_merge(TENANT, True).auto_merge
    assert flood(engine, [TENANT] * 4, 8)[-1] == TENANT
    engine.adapters.set_auto_merge(TENANT, False)
    engine.unmerge_adapter()
    assert flood(engine, [TENANT] * 4, 8) == [None] * 8


def test_merge_for_the_policy_refuses_an_unmarked_adapter(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, tmp_path)
    lease = engine.adapters.open(TENANT)
    with pytest.raises(AdapterError, match="auto_merge"):
        engine.lora.merge(lease, auto=True)
    assert engine.adapters.merged_name is None
    engine.lora.merge(lease)  # an admin's explicit merge is not the policy's
    assert engine.adapters.merged_name == TENANT
    engine.unmerge_adapter()
    lease.close()
    assert engine.adapters.num_refs(TENANT) == 0


@pytest.mark.parametrize(
    ("tokens", "eligible", "expected"),
    [
        ({"x": 100}, set(), None),  # all tokens on an ineligible adapter
        ({"x": 100}, {"x"}, "x"),
        ({"x": 60, "y": 40, None: 0}, {"y"}, None),  # y's 40% counts against everyone's tokens
        ({"x": 40, "y": 60}, {"y"}, "y"),
    ],
    ids=["ineligible-alone", "eligible-alone", "eligible-minority", "eligible-majority"],
)
def test_policy_picks_only_eligible_adapters(tokens: dict, eligible: set, expected: str | None) -> None:
    policy = MergePolicy(merge_threshold=0.5, unmerge_threshold=0.2, window=1, min_interval=1)
    decisions = [policy.observe(Counter(tokens), None, eligible.__contains__) for _ in range(5)]
    assert {d.adapter if d else None for d in decisions} == {expected}


def test_unregister_refuses_a_merged_adapter_unless_it_may_unmerge_it(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, tmp_path)
    before = weights(engine)
    engine.merge_adapter(SHARED)
    with pytest.raises(AdapterMergedError) as refused:
        engine.adapters.unregister(SHARED)
    assert (refused.value.status, refused.value.code) == (409, "adapter_merged")
    assert engine.adapters.merged_name == SHARED and engine.adapters.contains(SHARED)
    engine.remove_adapter(engine.adapters.get(SHARED))  # the engine thread's way: unmerge, then unregister
    assert engine.adapters.merged_name is None and same_weights(engine, before)
    assert not engine.adapters.contains(SHARED)
    engine.adapters.register(SHARED, tmp_path / "adapters" / SHARED, "upload")  # the name is free again


def test_merge_after_unregister_is_404_even_while_requests_hold_it(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, tmp_path)
    before = weights(engine)
    lease = engine.adapters.open(SHARED)  # an in-flight request: the weights stay on CPU until it ends
    engine.adapters.unregister(SHARED)
    with pytest.raises(AdapterNotFoundError):
        engine.lora.merge(lease)
    lease.close()
    assert engine.adapters.merged_name is None and same_weights(engine, before)
    engine.adapters.register(SHARED, tmp_path / "adapters" / SHARED, "upload")


def test_merge_racing_unregister_leaves_one_consistent_state(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, tmp_path)
    before = weights(engine)
    path = tmp_path / "adapters" / SHARED
    for _ in range(30):
        lease = engine.adapters.open(SHARED)  # what the merge route holds around its merge
        start = threading.Barrier(2)
        errors: dict[str, Exception] = {}

        def attempt(what: str, fn) -> None:
            start.wait()  # noqa: B023 (the threads are joined in this iteration)
            try:
                fn()
            except AdapterError as exc:
                errors[what] = exc  # noqa: B023

        threads = [
            threading.Thread(target=attempt, args=("merge", lambda: engine.lora.merge(lease))),  # noqa: B023
            threading.Thread(target=attempt, args=("unregister", lambda: engine.adapters.unregister(SHARED))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lease.close()
        if engine.adapters.contains(SHARED):  # the merge came first: merged, still registered
            assert engine.adapters.merged_name == SHARED and isinstance(errors["unregister"], AdapterMergedError)
            engine.remove_adapter(engine.adapters.get(SHARED))
        else:  # the unregister came first: the merge was refused, nothing merged
            assert engine.adapters.merged_name is None and isinstance(errors["merge"], AdapterNotFoundError)
        assert engine.adapters.merged_name is None and same_weights(engine, before)
        engine.adapters.register(SHARED, path, "adapter-dir")  # never stuck half-deleted: the name is free
