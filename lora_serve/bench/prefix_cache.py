"""Prefix caching, cold vs warm: requests behind one long shared system prompt, on the base and on adapters.

    lora-serve bench prefix-cache --system-len 1024 --question-len 32 --num-requests 16 --num-adapters 2

Two engines from one config but for enable_prefix_caching: "cold" (off: every prompt prefilled in
full) and "warm" (on). Both first run the system prompt once per model, the base and each adapter
(so warm starts as a server does once traffic flows, and both have run every code path once). Then
each round submits `num_requests` requests at once, spread round-robin over the base and the
adapters, each the system prompt and a question of its own, `max_tokens` greedy output tokens; rounds
alternate cold and warm, so both see the same machine load. Reported per mode (medians over rounds):
time to first token (submission to first token: mean and p50), the round's time, output tokens/s,
and the prompt tokens that were found cached.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ..config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..model.arch import ModelArch
from .random_adapters import write_random_adapter
from .runners import random_prompts
from .table import markdown_table

MODES = {"cold": False, "warm": True}  # mode -> enable_prefix_caching


def run(
    model_path: Path, system_len: int = 1024, question_len: int = 32, num_requests: int = 16, num_adapters: int = 2,
    rank: int = 16, max_tokens: int = 16, repeats: int = 3, seed: int = 0,
) -> list[dict]:  # fmt: skip
    arch = ModelArch.from_dir(model_path)
    names: list[str | None] = [None, *(f"a{i}" for i in range(num_adapters))]
    system = random_prompts(arch.vocab_size, [system_len], seed)[0]
    with tempfile.TemporaryDirectory() as tmp:
        modules = [f"a{i}={write_random_adapter(Path(tmp) / f'a{i}', arch, rank, seed + i)}" for i in range(num_adapters)]
        max_len = system_len + question_len + max_tokens
        engines = {mode: _engine(model_path, arch, modules, rank, caching, num_requests, max_len) for mode, caching in MODES.items()}
        for engine in engines.values():
            _round(engine, system, [[]] * len(names), names, max_tokens, "prime")
        rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for r in range(repeats):
            questions = random_prompts(arch.vocab_size, [question_len] * num_requests, seed + 1 + r)
            for mode, engine in engines.items():
                rounds[mode].append(_round(engine, system, questions, names, max_tokens, f"r{r}"))
    return [{"mode": mode, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}} for mode, rs in rounds.items()]


def _engine(model_path: Path, arch: ModelArch, modules: list[str], rank: int, caching: bool, num_requests: int, max_len: int) -> LLMEngine:
    bytes_per_token = 2 * arch.num_layers * arch.kv_size * 4  # float32, the widest dtype the engine resolves to
    kv_gb = 1.25 * (num_requests + len(modules) + 1) * (max_len + 16) * bytes_per_token / 2**30  # every request's blocks at once
    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory_gb=kv_gb, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=max(num_requests, len(modules) + 1), max_model_len=max(max_len, 16)),
        lora=LoRAConfig(lora_modules=modules, max_loras=max(len(modules), 1), max_lora_rank=rank),
    )
    return LLMEngine.from_config(config, model_path)


def _round(engine: LLMEngine, system: list[int], questions: list[list[int]], names: list[str | None], max_tokens: int, tag: str) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, question in enumerate(questions):
        engine.add_request(f"{tag}-{i}", system + question, params, names[i % len(names)])
    first: dict[str, float] = {}
    cached = output = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            if out.finished:
                cached += out.num_cached_tokens
                output += out.num_output_tokens
    seconds = time.perf_counter() - start
    ttft = list(first.values())
    return {
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": statistics.median(ttft), "round_s": seconds,
        "output_tok_s": output / seconds, "cached_tokens": cached, "prompt_tokens": sum(len(system) + len(q) for q in questions),
    }  # fmt: skip


def report(rows: list[dict]) -> str:
    cold = next(r for r in rows if r["mode"] == "cold")
    header = ["mode", "TTFT mean (s)", "TTFT p50 (s)", "round (s)", "output tok/s", "cached / prompt tokens", "TTFT vs cold"]
    body = [
        [
            r["mode"],
            f"{r['ttft_mean_s']:.3f}",
            f"{r['ttft_p50_s']:.3f}",
            f"{r['round_s']:.2f}",
            f"{r['output_tok_s']:.1f}",
            f"{r['cached_tokens']:.0f} / {r['prompt_tokens']:.0f}",
            f"{cold['ttft_mean_s'] / r['ttft_mean_s']:.2f}x",
        ]  # fmt: skip
        for r in rows
    ]
    return markdown_table(header, body)
