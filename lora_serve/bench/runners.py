"""Timed runs of one workload through lora-serve's engine and through the peers (transformers, PEFT).

Every runner returns a `Timing`: useful output tokens (padding excluded) and wall
seconds. Prompts are token-id lists; every request generates exactly its max_tokens
(EOS ignored) so all runners do the same work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..lora.composition import Composition
from ..model.arch import ModelArch


@dataclass
class Timing:
    tokens: int
    seconds: float

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def kv_cache_gb(model_path: Path, num_seqs: int, tokens_per_seq: int, floor_gb: float = 0.25) -> float:
    """A float32 KV cache that holds num_seqs sequences of tokens_per_seq tokens at once (a quarter more
    for whole blocks), and at least floor_gb: a batch that must run in one step never waits for blocks."""
    arch = ModelArch.from_dir(model_path)
    per_token = arch.num_layers * 2 * arch.kv_size * 4  # K and V, float32
    return max(floor_gb, 1.25 * num_seqs * tokens_per_seq * per_token / 1e9)


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids above 1000 avoid the special and byte tokens at the start of most vocabularies.
    return [torch.randint(1000, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def engine_generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int], loras: Sequence[str | None]) -> Timing:
    """All requests submitted at once, continuous batching until the last one finishes."""
    start = time.perf_counter()
    for i, (p, n, lora) in enumerate(zip(prompts, max_tokens, loras)):
        engine.add_request(f"bench-{i}", p, _greedy(n), lora)
    while engine.has_unfinished():
        engine.step()
    return Timing(sum(max_tokens), time.perf_counter() - start)


def engine_phases(
    engine: LLMEngine, prompts: list[list[int]], decode_steps: int, loras: Sequence[str | Composition | None]
) -> tuple[Timing, list[Timing]]:
    """(prefill, decode steps): the step that prefills every prompt, then each full-batch decode step
    timed on its own (a median over steps shrugs off the odd slow step of a shared machine)."""
    for i, (p, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"bench-{i}", p, _greedy(decode_steps + 1), lora)
    if engine.max_num_batched_tokens < sum(map(len, prompts)) or engine.scheduler.max_num_seqs < len(prompts):
        raise ValueError("the batch must fit one step: raise max_num_batched_tokens / max_num_seqs")
    t0 = time.perf_counter()
    engine.step()
    prefill = Timing(sum(map(len, prompts)), time.perf_counter() - t0)
    steps = []
    for _ in range(decode_steps):
        t = time.perf_counter()
        engine.step()
        steps.append(Timing(len(prompts), time.perf_counter() - t))
    assert not engine.has_unfinished()
    return prefill, steps


def engine_run_phases(
    engine: LLMEngine, prompts: list[list[int]], decode_steps: int, loras: Sequence[str | Composition | None]
) -> tuple[Timing, list[Timing], Timing]:
    """(prefill, decode steps, whole run) with every request submitted at once and run to the end.

    Unlike engine_phases the batch may need several prefill steps (more distinct adapters than
    slots: the scheduler rotates them). A step that starts any sequence counts as prefill (its
    prompt tokens over its time); a step that only extends sequences counts as one decode step.
    """
    for i, (p, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"bench-{i}", p, _greedy(decode_steps + 1), lora)
    started: set[str] = set()
    prefill, steps = Timing(0, 0.0), []
    t_start = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - t
        new = [o.request_id for o in outputs if o.request_id not in started]
        if new:
            started.update(new)
            prefill = Timing(prefill.tokens + sum(len(prompts[int(r.rsplit("-", 1)[1])]) for r in new), prefill.seconds + seconds)
        elif outputs:
            steps.append(Timing(len(outputs), seconds))
    total = Timing(len(prompts) * (decode_steps + 1), time.perf_counter() - t_start)
    return prefill, steps, total


@torch.inference_mode()
def hf_one_at_a_time(model, prompts: list[list[int]], max_tokens: list[int]) -> Timing:
    start = time.perf_counter()
    for p, n in zip(prompts, max_tokens):
        ids = torch.tensor([p])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return Timing(sum(max_tokens), time.perf_counter() - start)


@torch.inference_mode()
def hf_padded_batch(model, prompts: list[list[int]], max_tokens: list[int], pad_id: int, **generate_kwargs) -> Timing:
    """One left-padded batch; every row runs to the longest max_tokens, only useful tokens count."""
    ids, mask = left_pad(prompts, pad_id)
    n = max(max_tokens)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id, **generate_kwargs)
    return Timing(sum(max_tokens), time.perf_counter() - start)


class _StepClock:
    """A `generate` streamer that only timestamps: put() is called with the prompt, then once per step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_phases(model, prompts: list[list[int]], decode_steps: int, pad_id: int, **generate_kwargs) -> tuple[Timing, list[Timing]]:
    """(prefill, decode steps) for `generate` on one padded batch, each step timed by a streamer."""
    ids, mask = left_pad(prompts, pad_id)
    clock = _StepClock()
    n = decode_steps + 1
    model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        pad_token_id=pad_id,
        max_new_tokens=n,
        min_new_tokens=n,
        streamer=clock,
        **generate_kwargs,
    )
    t = clock.times  # [prompt, token 1 (prefill done), token 2, ...]
    prefill = Timing(sum(map(len, prompts)), t[1] - t[0])
    return prefill, [Timing(len(prompts), b - a) for a, b in zip(t[1:], t[2:])]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask
