"""What constrained rows cost a decode step: the same batch with none and with some rows held to a grammar.

    .venv/bin/python -m lora_serve.bench.grammar_step [--batch 16] [--constrained 4] [--steps 32] [--rounds 3]

The embedded model decodes `batch` greedy rows for `steps` tokens, `constrained` of them under a regex
that cannot end within those steps (so the batch keeps its size), the others free; then the same with
no constrained row, back to back, for `rounds` rounds. Reported: the median decode step time of each
(prefill steps left out) and their ratio, then the time xgrammar's CPU kernel takes to mask the
constrained rows of such a batch's logits (every token forbidden: each is written).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import xgrammar as xgr

from ..config import CacheConfig, EngineConfig, SchedulerConfig
from ..engine.grammar import GrammarSpec
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..model.default_model import resolve_model_path

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and quietly judge its form".split()


def decode_step_times(engine: LLMEngine, prompts: list[list[int]], num_constrained: int, steps: int) -> list[float]:
    assert engine.grammar_compiler is not None
    grammar = engine.grammar_compiler.compile(GrammarSpec("regex", "[a-z ]{2000}"))
    for i, prompt in enumerate(prompts):
        constrained = i < num_constrained
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, grammar=grammar if constrained else None)
        engine.add_request(f"r{i}", prompt, params)
    times = []
    while engine.has_unfinished():
        decoding = all(s.num_cached_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) and not engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--constrained", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="0: only the masking time")
    args = parser.parse_args()
    logits = torch.randn(args.batch, 49152)
    bitmask = torch.zeros((args.batch, 49152 // 32), dtype=torch.int32)
    rows = list(range(args.constrained))
    t0 = time.perf_counter()
    for _ in range(100):
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    print(f"masking {args.constrained} of {args.batch} rows of 49152 logits: {(time.perf_counter() - t0) / 100 * 1e6:.0f} us")
    if args.rounds == 0:
        return
    config = EngineConfig(scheduler=SchedulerConfig(max_model_len=512), cache=CacheConfig(kv_cache_memory_gb=0.25))
    engine = LLMEngine.from_config(config, resolve_model_path(None))
    prompts = [engine.tokenizer.encode(" ".join(WORDS[i % len(WORDS) :] + WORDS[: i % len(WORDS)])) for i in range(args.batch)]
    decode_step_times(engine, prompts, 0, 4)  # warm-up
    free: list[float] = []
    held: list[float] = []
    for _ in range(args.rounds):
        held += decode_step_times(engine, prompts, args.constrained, args.steps)
        free += decode_step_times(engine, prompts, 0, args.steps)
    f, h = statistics.median(free) * 1e3, statistics.median(held) * 1e3
    print(f"batch {args.batch}, {args.steps} decode steps x {args.rounds} rounds")
    print(f"no constrained row:         {f:.2f} ms per step")
    print(f"{args.constrained} constrained rows:        {h:.2f} ms per step ({h / f:.3f}x)")


if __name__ == "__main__":
    main()
