"""Engine token throughput vs transformers' `generate`, measured side by side in one run.

    lora-serve bench throughput --concurrency 1 8 32

For each concurrency N: N requests of mixed prompt and output lengths (seeded), run
(a) through the engine, all submitted at once; (b) through `generate` one request at a
time; (c) through `generate` on one left-padded batch of all N (every row runs to the
longest output; only requested tokens count). Output lengths are exact (EOS ignored).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config import CacheConfig, EngineConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from .runners import Timing, engine_generate, hf_one_at_a_time, hf_padded_batch, random_prompts
from .table import markdown_table


def workload(n: int, vocab_size: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompt_lens = [rng.randint(16, 128) for _ in range(n)]
    max_tokens = [rng.randint(16, 64) for _ in range(n)]
    return random_prompts(vocab_size, prompt_lens, seed), max_tokens


def run(model_path: Path, concurrency: list[int], seed: int = 0, sequential_sample: int = 4) -> list[dict]:
    from transformers import AutoModelForCausalLM

    engine = LLMEngine.from_config(
        EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=max(concurrency), max_model_len=256),
            cache=CacheConfig(kv_cache_memory_gb=1.0, enable_prefix_caching=False),
        ),
        model_path,
    )
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    engine_generate(engine, *workload(2, engine.arch.vocab_size, seed + 99), [None, None])  # warm-up
    rows = []
    for n in concurrency:
        prompts, max_tokens = workload(n, engine.arch.vocab_size, seed + n)
        ours = engine_generate(engine, prompts, max_tokens, [None] * n)
        # One at a time is a per-request rate: a sample of requests measures it without minutes of waiting.
        k = min(n, sequential_sample)
        one = hf_one_at_a_time(hf, prompts[:k], max_tokens[:k])
        batch = hf_padded_batch(hf, prompts, max_tokens, pad)
        rows.append({"concurrency": n, "engine": ours, "hf_one_at_a_time": one, "hf_padded_batch": batch, "sampled": k})
    return rows


def report(rows: list[dict]) -> str:
    def f(t: Timing) -> str:
        return f"{t.tok_per_s:.1f}"

    table = [
        [
            str(r["concurrency"]),
            f(r["engine"]),
            f(r["hf_one_at_a_time"]) + (f" ({r['sampled']} sampled)" if r["sampled"] < r["concurrency"] else ""),
            f(r["hf_padded_batch"]),
            f"{r['engine'].tok_per_s / r['hf_one_at_a_time'].tok_per_s:.2f}",
            f"{r['engine'].tok_per_s / r['hf_padded_batch'].tok_per_s:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(
        [
            "concurrent",
            "lora-serve tok/s",
            "generate 1-at-a-time tok/s",
            "generate padded batch tok/s",
            "vs 1-at-a-time",
            "vs padded batch",
        ],
        table,
    )
