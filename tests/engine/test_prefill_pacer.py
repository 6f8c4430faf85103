"""Prefill pacing: while streams decode, a long prompt gets the chunk that sizes the step to max_prefill_stall
decode steps, from the step times the engine measures, and each further long prompt waiting adds
max_prefill_stall - 1 decode steps; short prompts, and prompts while nothing decodes, are not paced; a long prompt waiting for the pace blocks
nobody; the tokens are those of whole-prompt prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lora_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from lora_serve.engine.kv_cache import KVCache
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.prefill_pacer import DECODE_WINDOW, LONG_PROMPT_MIN_TOKENS, LONG_PROMPT_STEPS, MIN_CHUNK, PrefillPacer
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.scheduler import Scheduler
from lora_serve.engine.sequence import Sequence

from .helpers import run_to_completion
from .test_admission import ARCH
from .test_prefix_cache import run


def pacer(decode_step: float | None, per_token: float | None, max_stall: float = 1.5) -> PrefillPacer:
    p = PrefillPacer(max_stall)
    p.decode_step, p.per_token = decode_step, per_token
    return p


# --- the estimates ------------------------------------------------------------------------------


def test_the_estimates_follow_the_steps_and_not_one_slow_step():
    p = PrefillPacer(1.5)
    p.observe(num_decodes=4, num_prompt_tokens=16, seconds=1.0)  # the decodes' share is not known yet: ignored
    assert p.per_token is None and p.decode_step is None
    p.observe(num_decodes=0, num_prompt_tokens=500, seconds=1.0)  # nothing decoded: every second is the prompt's
    assert p.per_token == pytest.approx(0.002)
    for seconds in (0.050, 0.060, 0.500, 0.055):  # one slow step among them
        p.observe(num_decodes=4, num_prompt_tokens=0, seconds=seconds)
    assert p.decode_step == pytest.approx(0.0575)  # the median
    p.observe(num_decodes=4, num_prompt_tokens=20, seconds=0.0575 + 0.080)  # 4 ms a token past the decodes
    assert p.per_token == pytest.approx(0.003)  # the median of 2 and 4 ms
    assert p.decode_step == pytest.approx(0.0575)  # a step with prompt tokens is not a decode step
    p.observe(num_decodes=0, num_prompt_tokens=0, seconds=5.0)  # an empty step changes nothing
    assert (p.decode_step, p.per_token) == (pytest.approx(0.0575), pytest.approx(0.003))
    for _ in range(DECODE_WINDOW):  # the window moves: the decodes' time follows their growing contexts
        p.observe(num_decodes=4, num_prompt_tokens=0, seconds=0.070)
    assert p.decode_step == pytest.approx(0.070)


def test_the_allowance_sizes_the_step_to_the_bound():
    assert pacer(0.050, 0.002, 1.5).allowance(16) == 12  # 12 tokens x 2 ms = 0.5 x 50 ms
    assert pacer(0.050, 0.002, 3.0).allowance(16) == 50
    assert pacer(0.050, 0.002, 1.5).allowance(16, num_long=3) == 37  # each long prompt waiting: 0.5 x 50 ms more
    assert pacer(0.050, 0.002, 1.5).allowance(16, num_long=0) == 12  # none yet: what one would get
    assert pacer(0.050, 0.100, 1.5).allowance(16) == MIN_CHUNK  # a long prompt always advances
    assert pacer(0.050, None).allowance(16) == MIN_CHUNK  # time one chunk first
    assert pacer(0.050, 0.002).allowance(0) is None  # nothing decodes: no limit
    assert pacer(None, 0.002).allowance(16) is None  # no decode step timed: nothing to pace against


def test_which_prompts_are_long():
    p = pacer(0.050, 0.002)  # LONG_PROMPT_STEPS decode steps: 0.8 s, 400 tokens
    cutoff = int(LONG_PROMPT_STEPS * 0.050 / 0.002)
    assert not p.is_long(cutoff) and p.is_long(cutoff + 1)
    slow = pacer(0.050, 0.1)  # every prompt past the token floor is long
    assert not slow.is_long(LONG_PROMPT_MIN_TOKENS) and slow.is_long(LONG_PROMPT_MIN_TOKENS + 1)
    assert pacer(0.050, None).is_long(LONG_PROMPT_MIN_TOKENS + 1)
    assert not pacer(None, 0.1).is_long(10_000)


def test_the_bound_must_exceed_one_step():
    with pytest.raises(ValueError, match="max_stall"):
        PrefillPacer(1.0)
    with pytest.raises(ValidationError, match="max_prefill_stall"):
        SchedulerConfig(max_prefill_stall=1.0)
    assert SchedulerConfig().max_prefill_stall == 2.0 and SchedulerConfig(max_prefill_stall=None).max_prefill_stall is None


# --- the scheduler ------------------------------------------------------------------------------


def kv_cache() -> KVCache:
    block = 16
    bytes_per_block = 2 * ARCH.num_layers * ARCH.kv_size * 4 * block  # float32
    config = CacheConfig(kv_cache_memory_gb=400 * bytes_per_block / 2**30, block_size=block)
    return KVCache(ARCH, config, torch.float32, torch.device("cpu"), 4096)


def seq(request_id: str, n: int) -> Sequence:
    salt = sum(map(ord, request_id))  # no two prompts share a block
    return Sequence(request_id, [(7 * i + salt) % 90 + 5 for i in range(n)], SamplingParams(max_tokens=400), torch.Generator())


def paced_scheduler(max_lora_bypass: int = 16, max_num_seqs: int = 8) -> tuple[Scheduler, list[Sequence]]:
    """Two streams decoding; the pace: 50 ms decode steps, 2 ms a prompt token (long: > 400 tokens; 12 a step
    for one long prompt)."""
    s = Scheduler(kv_cache(), max_num_seqs, 2048, max_lora_bypass=max_lora_bypass, max_prefill_stall=1.5)
    assert s.pacer is not None
    s.pacer.decode_step, s.pacer.per_token = 0.050, 0.002
    streams = [seq("s0", 8), seq("s1", 8)]
    for q in streams:
        s.add(q)
    run(s)  # their prompts (nothing decodes yet: no pace)
    return s, streams


def chunks(s: Scheduler) -> dict[str, int]:
    batch = s.schedule()
    for q, n in zip(batch.seqs, batch.num_new_tokens):  # as tests/engine/test_prefix_cache.py's run
        q.num_cached_tokens += n
        if q.num_new_tokens == 0:
            q.output_token_ids.append(1)
    return {q.request_id: n for q, n in zip(batch.seqs, batch.num_new_tokens)}


def test_a_long_prompt_beside_decodes_gets_the_allowance_and_a_short_one_goes_whole():
    s, streams = paced_scheduler()
    s.add(seq("long", 1000))
    s.add(seq("short", 300))  # past the token floor, but 0.6 s of prefill: under 16 decode steps
    assert chunks(s) == {"s0": 1, "s1": 1, "long": 12, "short": 300}
    assert chunks(s) == {"s0": 1, "s1": 1, "long": 12, "short": 1}
    for q in streams:
        s.finish(q, "stop")
    assert chunks(s) == {"short": 1, "long": 12}  # one stream decodes: still paced
    s.finish(next(q for q in s.running if q.request_id == "short"), "stop")
    assert chunks(s) == {"long": 1000 - 36}  # nothing decodes: the rest, within the step's budget


def test_long_prompts_share_one_allowance_and_one_waiting_for_it_blocks_nobody():
    s, _ = paced_scheduler(max_lora_bypass=1)
    s.add(seq("long-a", 1000))
    s.add(seq("long-b", 1000))
    for i in range(3):
        s.add(seq(f"short-{i}", 20))
    assert chunks(s) == {"s0": 1, "s1": 1, "long-a": 25, "short-0": 20, "short-1": 20, "short-2": 20}  # two long: 2 x 12.5
    waiting = s.waiting[0]
    assert waiting.request_id == "long-b" and waiting.num_bypassed == 0  # overtaken by three, but not for the bound
    s.add(seq("short-3", 20))
    step = chunks(s)
    assert step["long-a"] == 25 and "long-b" not in step and step["short-3"] == 20


def test_each_long_prompt_waiting_adds_to_the_allowance_and_they_finish_in_turn():
    s, _ = paced_scheduler()
    for i in range(3):
        s.add(seq(f"long-{i}", 1010))
    for _ in range(1010 // 37):
        assert chunks(s) == {"s0": 1, "s1": 1, "long-0": 37}  # three waiting for a first token: 3 x 12.5 ms
    left = 1010 % 37
    assert chunks(s) == {"s0": 1, "s1": 1, "long-0": left, "long-1": 37 - left}  # in turn, within one allowance
    assert chunks(s) == {"s0": 1, "s1": 1, "long-0": 1, "long-1": 25}  # long-0 decodes: two wait

    small, _ = paced_scheduler(max_num_seqs=3)  # room for one more sequence
    for i in range(3):
        small.add(seq(f"long-{i}", 1000))
    assert chunks(small) == {"s0": 1, "s1": 1, "long-0": 12}  # the two that cannot join this step add nothing


# --- the engine ---------------------------------------------------------------------------------


def engine(path: Path, **sched) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=0.05, block_size=8),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=512, **sched),
    )
    return LLMEngine.from_config(config, path)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True),
], ids=["greedy", "seeded"])  # fmt: skip
def test_paced_prefill_gives_whole_prefills_tokens_and_the_streams_a_token_every_step(tiny_llama_dir: Path, params: SamplingParams):
    prompts = {f"s{i}": [40 + i] * 6 for i in range(3)}
    prompts["long"] = [(11 * j) % 4000 + 30 for j in range(400)]
    requests = {rid: (p, params) for rid, p in prompts.items()}
    whole = run_to_completion(engine(tiny_llama_dir, max_prefill_stall=None), requests)

    e = engine(tiny_llama_dir, max_prefill_stall=1.5)
    pace = e.scheduler.pacer
    assert pace is not None
    pace.observe = lambda *_: None  # type: ignore[method-assign]  # fixed estimates: every prompt past the floor is long
    pace.decode_step, pace.per_token = 0.050, 0.100
    streams = {rid: (p, SamplingParams(max_tokens=80, temperature=params.temperature, top_p=params.top_p, seed=params.seed, ignore_eos=True))
               for rid, p in prompts.items() if rid != "long"}  # fmt: skip
    for rid, (p, sp) in streams.items():
        e.add_request(rid, p, sp)
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    for o in e.step():  # the streams' prompts, and their first token
        got[o.request_id] += o.new_token_ids
    e.add_request("long", prompts["long"], params)
    steps = 0
    while not got["long"]:
        outputs = e.step()
        assert {o.request_id for o in outputs} >= set(streams)  # every stream got its token in this step
        for o in outputs:
            got[o.request_id] += o.new_token_ids
        steps += 1
    assert steps == -(-400 // MIN_CHUNK)  # the long prompt in chunks of MIN_CHUNK
    while e.has_unfinished():
        for o in e.step():
            got[o.request_id] += o.new_token_ids
    assert got["long"] == whole["long"]["tokens"]
    assert all(got[rid][:12] == whole[rid]["tokens"] for rid in streams)  # the same seeds and prompts: the same start
