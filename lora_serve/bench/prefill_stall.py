"""What a long prompt arriving mid-stream costs the streams already decoding, per prefill chunk size.

    lora-serve bench prefill-stall --num-streams 16 --long-prompt-len 4000 --chunks 0 2048 512 128 --stalls 2
    lora-serve bench prefill-stall --num-streams 4 --long-prompt-len 1000 --num-long-prompts 6   # a queue of them

For each chunk size (0: the whole prompt in one step, as without chunked prefill; otherwise
--long-prefill-token-threshold, with the default 2048-token step budget), without pacing, and for each
--max-prefill-stall (the chunks the pacer sizes from measured steps, engine/prefill_pacer.py, with the
default budget): `num_streams` sequences
are brought to decoding, `warm_steps` decode steps are timed alone ("before"), then the long prompt
(or `num_long_prompts` of them, together) arrives and every step until each has its first token is
timed ("during"). Each step gives every
stream one token, so a step's time is each stream's inter-token latency (ITL) for that token.

The streams' contexts grow by a token each step, and so do their own attention reads: over the 250
steps of a 4000-token prompt in 16-token chunks, 16 streams go from 48 to ~300 tokens of context.
So the same streams then run again, on the same engine, without the long prompt, and the same
steps are timed ("alone": their prompts again, `warm_steps` untimed, then as many steps as
"during" had, at the same contexts). during p99 / alone p99 is what the long prompt costs them;
during p99 / before p99 mixes in their own growth.

Reported per chunk size or stall bound: ITL p50 and p99 before, during and alone, both ratios, the long
prompts' time to first token (the mean and the last, where several arrive), and their tokens a step. One process runs every setting, in turn, so the
ratios are measured side by side.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..config import CacheConfig, EngineConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from .runners import random_prompts
from .table import markdown_table

WHOLE_PROMPT_BUDGET = 16384  # chunk size 0: a step budget that fits the long prompt whole


def run(
    model_path: Path, num_streams: int = 16, long_prompt_len: int = 4000, chunks: tuple[int, ...] = (0, 2048, 512, 128),
    stream_prompt_len: int = 32, warm_steps: int = 16, seed: int = 0, stalls: tuple[float, ...] = (),
    num_long_prompts: int = 1,
) -> list[dict]:  # fmt: skip
    """Rows of `chunks` (unpaced), then of `stalls` (paced, chunks up to the step budget)."""
    rows = []
    for chunk, stall in [*((c, None) for c in chunks), *((0, s) for s in stalls)]:
        # The server's defaults but for the chunk size and pacing; chunk 0 unpaced gets a step budget the
        # long prompt fits in whole.
        scheduler = SchedulerConfig(
            max_num_seqs=num_streams + num_long_prompts,
            max_model_len=max(long_prompt_len + 8, stream_prompt_len + 512),
            max_num_batched_tokens=max(WHOLE_PROMPT_BUDGET, long_prompt_len) if chunk == 0 and stall is None else None,
            long_prefill_token_threshold=chunk or None,
            max_prefill_stall=stall,
        )
        engine = LLMEngine.from_config(EngineConfig(scheduler=scheduler, cache=CacheConfig(kv_cache_memory_gb=1.0)), model_path)
        vocab = engine.arch.vocab_size
        long_prompts = random_prompts(vocab, [long_prompt_len] * num_long_prompts, seed + 1)
        stream_prompts = random_prompts(vocab, [stream_prompt_len] * num_streams, seed)
        rows.append({"chunk": chunk, "stall": stall, **_measure(engine, stream_prompts, long_prompts, warm_steps)})
        del engine
    return rows


def _measure(engine: LLMEngine, stream_prompts: list[list[int]], long_prompts: list[list[int]], warm_steps: int) -> dict:
    before = _start_streams(engine, stream_prompts, "s", warm_steps)
    for i, prompt in enumerate(long_prompts):
        engine.add_request(f"long{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    arrived, during = time.perf_counter(), []
    ttfts: dict[str, float] = {}  # request id -> seconds from arrival to its first token
    while len(ttfts) < len(long_prompts):
        seconds, outputs = _timed_step(engine)
        during.append(seconds)
        now = time.perf_counter()
        ttfts.update((out.request_id, now - arrived) for out in outputs if out.request_id.startswith("long"))
    chunk = sum(map(len, long_prompts)) / len(during)
    _stop_streams(engine, len(stream_prompts), "s")
    _start_streams(engine, stream_prompts, "a", warm_steps)  # the same streams, the same steps, no long prompt
    alone = [_timed_step(engine)[0] for _ in during]
    _stop_streams(engine, len(stream_prompts), "a")
    return {
        "itl_p50_before": statistics.median(before), "itl_p99_before": _p99(before),
        "itl_p50_during": statistics.median(during), "itl_p99_during": _p99(during),
        "itl_p50_alone": statistics.median(alone), "itl_p99_alone": _p99(alone),
        "p99_ratio": _p99(during) / _p99(alone), "p99_ratio_before": _p99(during) / _p99(before),
        "long_ttft_s": statistics.mean(ttfts.values()), "last_ttft_s": max(ttfts.values()),
        "steps_during": len(during), "mean_chunk": chunk,
    }  # fmt: skip


def _start_streams(engine: LLMEngine, prompts: list[list[int]], prefix: str, warm_steps: int) -> list[float]:
    """Bring streams `prefix`0.. to decoding (untimed), then time `warm_steps` decode steps."""
    for i, prompt in enumerate(prompts):  # streams that run until stopped
        params = SamplingParams(max_tokens=engine.max_model_len - len(prompt), temperature=0.0, ignore_eos=True)
        engine.add_request(f"{prefix}{i}", prompt, params)
    while any(s.num_new_tokens > 1 for s in [*engine.scheduler.running, *engine.scheduler.waiting]):
        engine.step()  # the streams' prefills, not timed
    return [_timed_step(engine)[0] for _ in range(warm_steps)]


def _stop_streams(engine: LLMEngine, count: int, prefix: str) -> None:
    for i in range(count):
        engine.abort_request(f"{prefix}{i}")


def _timed_step(engine: LLMEngine) -> tuple[float, list[RequestOutput]]:
    start = time.perf_counter()
    outputs = engine.step()
    return time.perf_counter() - start, outputs


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def report(rows: list[dict], long_prompt_len: int, num_long_prompts: int = 1) -> str:
    table = [
        [
            _setting(r),
            *(f"{1e3 * r[f'itl_{q}_{phase}']:.0f}" for phase in ("before", "during", "alone") for q in ("p50", "p99")),
            f"{r['p99_ratio']:.2f}", f"{r['p99_ratio_before']:.2f}", str(r["steps_during"]), f"{r['mean_chunk']:.0f}",
            f"{r['long_ttft_s']:.1f}" if num_long_prompts == 1 else f"{r['long_ttft_s']:.1f} / {r['last_ttft_s']:.1f}",
        ]
        for r in rows
    ]  # fmt: skip
    header = [
        "prefill chunk (tokens) or pacing",
        "ITL p50 before (ms)",
        "ITL p99 before (ms)",
        "ITL p50 during (ms)",
        "ITL p99 during (ms)",
        "ITL p50 alone, same steps (ms)",
        "ITL p99 alone, same steps (ms)",
        "p99 during / alone",
        "p99 during / before",
        "steps until its first token",
        "prompt tokens a step (mean)",
        f"{long_prompt_len}-token prompt TTFT (s)"
        if num_long_prompts == 1
        else f"{num_long_prompts} x {long_prompt_len}-token prompts' TTFT, mean / last (s)",
    ]
    return markdown_table(header, table)


def _setting(row: dict) -> str:
    if row["stall"] is not None:
        return f"paced, --max-prefill-stall {row['stall']:g}"
    return "whole prompt" if row["chunk"] == 0 else str(row["chunk"])
