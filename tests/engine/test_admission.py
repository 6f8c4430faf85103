"""Adapter-aware admission: requests that load no adapter go first, but none is overtaken by more than
max_lora_bypass later arrivals; a request whose adapter finds every slot pinned is not starved; the order
changes no request's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lora_serve.engine.kv_cache import KVCache
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.scheduler import Scheduler
from lora_serve.engine.sequence import Sequence
from lora_serve.lora.composition import Composition
from lora_serve.model.arch import ModelArch

from .helpers import run_to_completion

ARCH = ModelArch(
    "LlamaForCausalLM",
    vocab_size=100,
    hidden_size=8,
    intermediate_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    attention_bias=False,
    rope_theta=10000.0,
)
BLOCK = 4


def kv_cache(num_blocks: int = 256) -> KVCache:
    bytes_per_block = 2 * ARCH.num_layers * ARCH.kv_size * 4 * BLOCK  # float32
    gb = (num_blocks + 1) * bytes_per_block / 2**30  # + the padding block
    config = CacheConfig(kv_cache_memory_gb=gb, block_size=BLOCK)
    return KVCache(ARCH, config, torch.float32, torch.device("cpu"), min(64, num_blocks * BLOCK))


class FakeSlots:
    """An AdapterAdmission with `num_slots` device slots, pinned by running sequences as LoRAManager's are.
    A new adapter takes an empty slot, else an unpinned one; `loads` lists the adapters copied in."""

    def __init__(self, num_slots: int, resident: tuple[str, ...] = ()):
        self.names: list[str | None] = [*resident, *[None] * (num_slots - len(resident))]
        self.pins = [0] * num_slots
        self.loads: list[str] = []

    def is_resident(self, name: str) -> bool:
        return name in self.names

    def try_admit(self, seq: Sequence) -> bool:
        if seq.lora_name is None:
            return True
        if seq.lora_name in self.names:
            slot = self.names.index(seq.lora_name)
        else:
            free = [i for i, p in enumerate(self.pins) if p == 0]
            if not free:
                return False
            slot = next((i for i in free if self.names[i] is None), free[0])
            self.names[slot] = seq.lora_name
            self.loads.append(seq.lora_name)
        self.pins[slot] += 1
        seq.lora_slot = slot
        return True

    def release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.pins[seq.lora_slot] -= 1
            seq.lora_slot = None


def seq(request_id: str, lora_name: str | None, prompt_len: int = 4) -> Sequence:
    return Sequence(request_id, [7] * prompt_len, SamplingParams(max_tokens=4), torch.Generator(), lora_name)


def scheduler(slots: FakeSlots, bound: int, max_num_seqs: int, num_blocks: int = 256) -> Scheduler:
    return Scheduler(kv_cache(num_blocks), max_num_seqs, 256, slots, max_lora_bypass=bound)


@pytest.mark.parametrize(("bound", "admitted", "left"), [(16, ["X1", "X2"], ["Y1"]), (1, ["X1", "Y1"], ["X2"]), (0, ["Y1", "X1"], ["X2"])])
def test_resident_adapters_go_first_within_the_bound(bound: int, admitted: list[str], left: list[str]):
    """X is in a slot, Y is not (a free slot could take it); room for two of [Y1, X1, X2]."""
    slots = FakeSlots(2, resident=("X",))
    s = scheduler(slots, bound, max_num_seqs=2)
    for q in (seq("Y1", "Y"), seq("X1", "X"), seq("X2", "X")):
        s.add(q)
    assert [q.request_id for q in s.schedule().seqs] == admitted
    assert [q.request_id for q in s.waiting] == left
    assert slots.loads == (["Y"] if "Y1" in admitted else [])


def test_base_requests_rank_with_resident_adapters():
    s = scheduler(FakeSlots(2, resident=("X",)), 16, max_num_seqs=2)
    for q in (seq("Y1", "Y"), seq("B1", None), seq("X1", "X")):
        s.add(q)
    assert [q.request_id for q in s.schedule().seqs] == ["B1", "X1"]
    assert s.waiting[0].num_bypassed == 2


def test_an_adapter_loaded_this_step_makes_its_other_requests_cheap():
    s = scheduler(FakeSlots(3), 16, max_num_seqs=3)
    for q in (seq("Y1", "Y"), seq("Z1", "Z"), seq("Y2", "Y")):
        s.add(q)
    assert [q.request_id for q in s.schedule().seqs] == ["Y1", "Y2", "Z1"]


def test_memory_is_first_come_first_served_in_the_chosen_order():
    # 10 usable blocks of 4 tokens: X1's 48-token prompt does not fit, so B1 behind it waits too.
    s = Scheduler(kv_cache(10), 4, 256, FakeSlots(2, resident=("X",)), max_lora_bypass=16)
    for q in (seq("Y1", "Y", 4), seq("X1", "X", 48), seq("B1", None, 4)):
        s.add(q)
    assert s.schedule().seqs == [] and len(s.waiting) == 3


def drive(s: Scheduler, arrivals: dict[int, list[Sequence]], steps: int, life: int = 1) -> list[Sequence]:
    """Step `steps` times; arrivals[step] join the queue before that step; a sequence runs `life` steps,
    then finishes. The sequences in the order they were admitted."""
    order: list[Sequence] = []
    ran: dict[Sequence, int] = {}
    for step in range(steps):
        for q in arrivals.get(step, []):
            s.add(q)
        for q in s.schedule().seqs:
            if q not in ran:
                order.append(q)
            ran[q] = ran.get(q, 0) + 1
            q.num_cached_tokens = q.num_tokens  # as if the model ran it and sampled a token
            q.output_token_ids.append(0)
        for q in list(s.running):
            if ran[q] >= life:
                s.finish(q, "length")
    return order


def overtakes(order: list[Sequence], arrival: list[Sequence]) -> dict[str, int]:
    """Per request: how many requests that arrived after it were admitted before it."""
    rank = {q: i for i, q in enumerate(arrival)}
    return {q.request_id: sum(rank[p] > rank[q] for p in order[:i]) for i, q in enumerate(order)}


@pytest.mark.parametrize("bound", [0, 1, 3, 16])
def test_no_request_is_overtaken_more_than_the_bound(bound: int):
    """X is resident and two X requests arrive every step, room for two admissions a step: Y (from the
    start) and Z (at step 2) would never go first, and each is overtaken by exactly `bound` requests."""
    s = scheduler(FakeSlots(3, resident=("X",)), bound, max_num_seqs=2)
    arrivals = {step: [seq(f"X{step}.{i}", "X") for i in range(2)] for step in range(40)}
    arrivals[0].insert(0, seq("Y", "Y"))
    arrivals[2].insert(0, seq("Z", "Z"))
    arrival = [q for step in sorted(arrivals) for q in arrivals[step]]
    order = drive(s, arrivals, steps=40)
    counts = overtakes(order, arrival)
    assert counts["Y"] == counts["Z"] == bound
    assert max(counts.values()) == bound
    assert max(q.num_bypassed for q in arrival) == bound
    if bound == 0:
        assert order == arrival[: len(order)]  # strict FCFS


@pytest.mark.parametrize("bound", [0, 2, 16])
def test_a_request_whose_adapter_finds_every_slot_pinned_gets_one_as_they_drain(bound: int):
    """One slot, pinned by X requests that keep arriving (each runs 3 steps): after `bound` of them went
    ahead, no later one is admitted, the running ones finish, and Y gets the slot."""
    slots = FakeSlots(1)
    s = scheduler(slots, bound, max_num_seqs=4)
    arrivals = {step: [seq(f"X{step}", "X")] for step in range(80)}
    arrivals[1].append(seq("Y", "Y"))
    arrival = [q for step in sorted(arrivals) for q in arrivals[step]]
    order = drive(s, arrivals, steps=80, life=3)
    y = next(q for q in arrival if q.request_id == "Y")
    assert y in order, "starved"
    assert overtakes(order, arrival)["Y"] == bound
    assert order.index(y) == bound + 2  # after X0 and X1 (which arrived before it) and the X that overtook it
    assert slots.loads[:2] == ["X", "Y"]


# --- through the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    arch = ModelArch.from_dir(tiny_llama_dir)
    out = tmp_path_factory.mktemp("admission-adapters")
    return [f"a{i}={write_random_adapter(out / f'a{i}', arch, rank=4, seed=i, alpha=64.0)}" for i in range(3)]


def test_admission_order_changes_no_tokens(tiny_llama_dir: Path, adapters: list[str]):
    """Greedy outputs with strict FCFS (bound 0) and with the default bound are identical, though the
    requests were admitted in another order."""
    names = ["a0", "a1", "a0", "a2", None, "a1", "a0", "a2", None, "a2"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": ([(11 * i + 5 * j) % 4000 + 30 for j in range(6 + i)], params) for i in range(len(names))}
    lora = {f"r{i}": n for i, n in enumerate(names)}
    results, orders = {}, {}
    for bound in (0, SchedulerConfig().max_lora_bypass):
        config = EngineConfig(
            cache=CacheConfig(kv_cache_memory_gb=0.02, block_size=8),
            scheduler=SchedulerConfig(max_num_seqs=3, max_model_len=128, max_lora_bypass=bound),
            lora=LoRAConfig(max_loras=2, max_lora_rank=8, lora_modules=adapters),
        )
        engine = LLMEngine.from_config(config, tiny_llama_dir)
        order: list[str] = []
        overtake = engine.scheduler._overtake
        engine.scheduler._overtake = lambda q, paced_out: (order.append(q.request_id), overtake(q, paced_out))[1]  # noqa: B023 (this engine's, this iteration)
        results[bound] = {rid: r["tokens"] for rid, r in run_to_completion(engine, requests, lora).items()}
        orders[bound] = order
        assert engine.lora.residency.num_pins() == 0 and engine.kv_cache.usage == 0.0
    assert orders[0] == list(requests)  # FCFS
    assert orders[0] != orders[SchedulerConfig().max_lora_bypass]
    assert results[0] == results[SchedulerConfig().max_lora_bypass]
    assert len({tuple(t) for t in results[0].values()}) == len(names)  # every request its own answer


def test_compositions_wait_for_all_their_adapters_and_change_no_tokens(tiny_llama_dir: Path, adapters: list[str]):
    """max_loras=2: a composition of two takes every slot, so it and the plain requests queue for each other;
    all finish, each with the tokens it gets alone, and nothing stays pinned."""
    lora: dict[str, str | Composition | None] = {
        "p0": "a0",
        "c01": Composition.of({"a0": 0.7, "a1": -0.5}),
        "p2": "a2",
        "c12": Composition.of({"a1": 1.0, "a2": 0.5}),
        "b": None,
        "s2": Composition.of({"a2": 0.25}),
        "p1": "a1",
        "c01b": Composition.of({"a0": 0.7, "a1": -0.5}),
    }
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = {rid: ([(13 * i + 7 * j) % 4000 + 30 for j in range(5 + i)], params) for i, rid in enumerate(lora)}
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.02, block_size=8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=128),
        lora=LoRAConfig(max_loras=2, max_lora_rank=8, lora_modules=adapters),
    )
    engine = LLMEngine.from_config(config, tiny_llama_dir)
    together = {rid: r["tokens"] for rid, r in run_to_completion(engine, requests, lora).items()}
    alone = {rid: run_to_completion(engine, {rid: requests[rid]}, {rid: lora[rid]})[rid]["tokens"] for rid in requests}
    assert together == alone
    assert len({tuple(t) for t in together.values()}) == len(lora)  # every request its own answer
    residency = engine.lora.residency
    assert residency.num_pins() == 0 and residency.num_virtual() == 0 and len(residency.names()) <= 2
