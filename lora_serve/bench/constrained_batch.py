"""What constrained rows cost the free rows that share their decode steps (`lora-serve bench structured`, structured.py).

    lora-serve bench structured --batch 32 --constrained 16 --num-adapters 8 --output-len 32 --rounds 3

One engine over the model (default: the embedded one) and `num_adapters` random adapters in memory.
A batch is `batch` greedy rows, row i on adapter i mod num_adapters (so both halves span every
adapter); the first `constrained` rows are each held to a JSON schema of its own, the others free.
Each round runs that batch, then the same rows with no constraint, back to back (the order swaps
every round, so a slow spell of a shared machine hits both). Only decode steps are timed (every row
past its prompt); a step's time is the time per output token (TPOT) of every row in it, the free
rows included. Reported: the median TPOT of both batches and their ratio (target: <= 1.10), then what
the masks cost per step, measured outside the timed steps on the constrained batch's rows: filling
them (xgrammar, on the step's worker thread while the model runs) and applying them to the logits.

The schemas are generated: objects whose properties differ in names, types and order (integer,
number, boolean, enum, a nested object, an array), ending in a string property whose minLength
(64 characters per measured step) no row can reach within `output_len` tokens, so no constrained
row finishes early and the batch keeps its size; run() checks that it did.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from ..engine.grammar import Grammar, GrammarSpec
from ..engine.grammar_bitmask import GrammarBitmask
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..model.arch import ModelArch
from .random_adapters import random_lora_model
from .runners import random_prompts
from .table import markdown_table

WORDS = "city name count score level title owner price colour stage rank weight label code index".split()
VALUE_TYPES: list[dict] = [
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"type": "string", "maxLength": 8}}, "required": ["id", "tag"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
]


def schema(i: int, min_chars: int) -> dict:
    """The i-th schema: five properties named and typed after i, then a string of at least min_chars."""
    names = [f"{WORDS[(i + 3 * k) % len(WORDS)]}_{i}_{k}" for k in range(5)]
    props = {name: VALUE_TYPES[(i + k) % len(VALUE_TYPES)] for k, name in enumerate(names)}
    props[f"notes_{i}"] = {"type": "string", "minLength": min_chars}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def run(
    model_path: Path, batch: int = 32, constrained: int = 16, num_adapters: int = 8, rank: int = 16,
    prompt_len: int = 32, output_len: int = 32, rounds: int = 3, seed: int = 0,
) -> dict:  # fmt: skip
    """Median decode step times (s) of the batch with and without its constrained rows, and the masks' cost per step."""
    engine = _engine(model_path, batch, num_adapters, rank, max(prompt_len + output_len, 16))
    assert engine.grammar_compiler is not None  # the model directory has a tokenizer
    grammars = [
        engine.grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(schema(i, 64 * output_len)))) for i in range(constrained)
    ]
    prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * batch, seed)
    adapters = [f"bench-{i % num_adapters}" if num_adapters else None for i in range(batch)]
    times: dict[str, list[float]] = {"free": [], "mixed": []}
    fill: list[float] = []
    apply: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        _decode(engine, prompts, adapters, grammars, 2, pool, "warm-up")  # fills the slots, runs every path once
        for r in range(rounds):
            for label in ("mixed", "free") if r % 2 == 0 else ("free", "mixed"):
                steps, masks = _decode(engine, prompts, adapters, grammars if label == "mixed" else [], output_len, pool, f"{label}{r}")
                times[label] += steps
                fill += [f for f, _ in masks]
                apply += [a for _, a in masks]
    free, mixed = statistics.median(times["free"]), statistics.median(times["mixed"])
    return {
        "batch": batch, "constrained": constrained, "num_adapters": num_adapters, "output_len": output_len, "rounds": rounds,
        "free_tpot_s": free, "mixed_tpot_s": mixed, "ratio": mixed / free,
        "mask_fill_s": statistics.median(fill) if fill else 0.0, "mask_apply_s": statistics.median(apply) if apply else 0.0,
    }  # fmt: skip


def _engine(model_path: Path, batch: int, num_adapters: int, rank: int, max_len: int) -> LLMEngine:
    arch = ModelArch.from_dir(model_path)
    kv_gb = 1.25 * batch * (max_len + 16) * 2 * arch.num_layers * arch.kv_size * 4 / 2**30  # float32, every row's blocks at once
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=kv_gb, enable_prefix_caching=False),  # rounds repeat the prompts: prefill runs cold
        scheduler=SchedulerConfig(max_num_seqs=batch, max_model_len=max_len, max_num_batched_tokens=max(2048, batch * max_len)),
        lora=LoRAConfig(max_loras=max(num_adapters, 1), max_lora_rank=rank),
    )
    engine = LLMEngine.from_config(config, model_path)
    for i in range(num_adapters):
        model = random_lora_model(f"bench-{i}", engine.arch, rank, seed=i)
        engine.adapters.register(model.name, Path(f"random:{model.name}"), "random", model)
    return engine


def _decode(
    engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], grammars: list[Grammar], steps: int,
    pool: ThreadPoolExecutor, tag: str,
) -> tuple[list[float], list[tuple[float, float]]]:  # fmt: skip
    """Run the batch to `steps` output tokens; the decode steps' times (s), and (fill, apply) times (s) of the masks
    of each of them that had constrained rows, measured just before it."""
    for i, prompt in enumerate(prompts):
        grammar = grammars[i] if i < len(grammars) else None
        engine.add_request(
            f"{tag}-{i}", prompt, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, grammar=grammar), adapters[i]
        )
    logits = torch.randn(len(prompts), engine.arch.vocab_size)  # stands in for a step's [B, V] logits
    times: list[float] = []
    masks: list[tuple[float, float]] = []
    while engine.has_unfinished():
        running = list(engine.scheduler.running)
        decoding = not engine.scheduler.waiting and all(s.num_cached_tokens >= s.num_prompt_tokens for s in running)
        if decoding and grammars:
            masks.append(_mask_times(running, logits[: len(running)], engine.arch.vocab_size, pool))
        t0 = time.perf_counter()
        outputs = engine.step()
        if decoding:
            times.append(time.perf_counter() - t0)
        for out in outputs:
            if out.finish_reason is not None and out.num_output_tokens < steps:
                raise RuntimeError(f"{out.request_id} finished after {out.num_output_tokens} of {steps} tokens: the batch shrank")
    return times, masks


def _mask_times(seqs: list, logits: torch.Tensor, vocab_size: int, pool: ThreadPoolExecutor) -> tuple[float, float]:
    """What the step about to run does for its masks, timed: fill them (the matchers are only read), apply and restore."""
    t0 = time.perf_counter()
    pending = GrammarBitmask.fill(seqs, vocab_size, pool)
    assert pending is not None  # called only when some row has a grammar
    pending.filled.result()
    t1 = time.perf_counter()
    pending.restore(logits, pending.apply(logits, seqs))
    return t1 - t0, time.perf_counter() - t1


def report(result: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    header = [
        "batch",
        "TPOT, no constrained row (ms)",
        f"TPOT, {result['constrained']} constrained (ms)",
        "ratio",
        "mask fill (ms)",
        "mask apply (ms)",
    ]
    row = [
        f"{result['batch']} rows, {result['num_adapters']} adapters", ms(result["free_tpot_s"]), ms(result["mixed_tpot_s"]),
        f"{result['ratio']:.3f}x", ms(result["mask_fill_s"]), ms(result["mask_apply_s"]),
    ]  # fmt: skip
    steps = f"# {result['output_len']} tokens x {result['rounds']} rounds; the ratio's target is <= 1.10; masks per decode step, median"
    return steps + "\n" + markdown_table(header, [row])
