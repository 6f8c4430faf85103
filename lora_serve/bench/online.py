"""Drive a running server with a seeded trace over streamed /v1/completions, and time every request.

    lora-serve bench serve --url http://127.0.0.1:8000 --adapter-prefix bench- --num-adapters 100 \\
        --alpha 0.5 --request-rate 2 --num-requests 200 --result-dir results/

Open loop: each request is sent at its trace arrival time (Gamma gaps), capped by
--concurrency in flight. Rate inf with --concurrency c is a closed loop of c clients.
Outputs are exact (`ignore_eos`), so runs of the same trace do the same work.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from itertools import islice

import httpx

from .metrics import RequestRecord, aggregate
from .serve_config import ClientConfig, WorkloadConfig
from .workload import RequestSpec, make_trace


async def send_one(client: httpx.AsyncClient, spec: RequestSpec, model: str, timeout_s: float, extra: dict | None = None) -> RequestRecord:
    """One streamed completion; chunk arrival times give TTFT and ITL, the usage chunk the token counts.
    extra: fields added to the body (llama.cpp's per-request adapters)."""
    body = {
        **(extra or {}),
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    rec = RequestRecord(spec.index, model, spec.input_len, spec.output_len)
    rec.start_s = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    rec.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                if chunk.get("choices"):
                    if rec.ttft_s == 0.0:
                        rec.ttft_s = now - rec.start_s
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                    rec.input_len = chunk["usage"]["prompt_tokens"]
                    rec.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        rec.e2el_s = time.perf_counter() - rec.start_s
        if rec.error is None and rec.output_tokens != spec.output_len:
            rec.error = f"{rec.output_tokens} output tokens, {spec.output_len} requested"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    return rec


async def run_trace(
    client: httpx.AsyncClient,
    trace: list[RequestSpec],
    model_of: Callable[[RequestSpec], str | tuple[str, dict]],
    concurrency: int | None,
    timeout_s: float,
    duration_s: float | None = None,
    on_done: Callable[[RequestRecord], object] | None = None,
) -> tuple[list[RequestRecord], float]:
    """(records, wall seconds). Requests start at their arrival times; a semaphore caps those in flight.
    model_of gives a request's model, or (model, extra body fields)."""
    gate = asyncio.Semaphore(concurrency or len(trace) or 1)
    start = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestRecord | None:
        await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
        async with gate:
            if duration_s is not None and time.perf_counter() - start > duration_s:
                return None  # closed loop past --duration: not sent
            target = model_of(spec)
            model, extra = target if isinstance(target, tuple) else (target, None)
            rec = await send_one(client, spec, model, timeout_s, extra)
        if on_done:
            on_done(rec)
        return rec

    results = await asyncio.gather(*(one(s) for s in trace))
    return [r for r in results if r is not None], time.perf_counter() - start


async def discover_base(client: httpx.AsyncClient) -> str:
    """The base model's id from GET /v1/models (the model without a parent)."""
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    models = resp.json()["data"]
    return next((m for m in models if not m.get("parent")), models[0])["id"]


async def bench(workload: WorkloadConfig, cfg: ClientConfig) -> list[dict]:
    """One result per (rate, round, target): target is the adapters, the base, or both (with --with-base)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits, timeout=cfg.timeout_s) as client:
        base = cfg.base_model or await discover_base(client)
        targets = ["base"] if cfg.base_only or not workload.adapter_names() else ["adapters"]
        if cfg.with_base:
            targets.append("base")
        rounds = cfg.rounds if cfg.with_base else 1
        # Each (rate, round) and the warm-up draw prompts of their own (workload.py): no round is served
        # from the prefix cache an earlier one filled. Within a round, adapters and base get the same
        # prompts; the cache keys K/V by adapter, so neither finds the other's.
        warmup_set = len(workload.request_rate) * rounds
        first = list(islice(make_trace(workload, cfg.vocab_size, prompt_set=warmup_set), cfg.warmup_requests))
        await run_trace(client, first, lambda s: base, workload.concurrency, cfg.timeout_s)
        results = []
        for i, rate in enumerate(workload.request_rate):
            for round_ in range(rounds):
                trace = list(make_trace(workload, cfg.vocab_size, rate, prompt_set=i * rounds + round_))
                for target in targets:
                    results.append(await _measure(client, workload, cfg, trace, rate, target, base, round_))
    return results


async def _measure(
    client, workload: WorkloadConfig, cfg: ClientConfig, trace: list[RequestSpec], rate: float, target: str, base: str, round_: int
) -> dict:
    """One pass of the trace at `rate` to `target` (adapters or base): the aggregate, run settings and records."""
    from tqdm import tqdm

    if cfg.llama_cpp_loras:  # llama.cpp names adapters in the body, beside the base model
        model_of = (lambda s: base) if target == "base" else (lambda s: (base, cfg.extra_body(s.adapter)))
    else:
        model_of = (lambda s: base) if target == "base" else (lambda s: s.adapter or base)
    bar = tqdm(total=len(trace), desc=f"{cfg.label} {target} rate={rate:g} round {round_}", unit="req", disable=not cfg.progress)
    records, wall = await run_trace(client, trace, model_of, workload.concurrency, cfg.timeout_s, workload.duration, lambda r: bar.update())
    bar.close()
    summary = aggregate(records, wall, cfg.slos())
    summary.update(label=cfg.label, target=target, round=round_, request_rate=rate, burstiness=1 / workload.cv**2,
                   max_concurrency=workload.concurrency, num_prompts=len(trace), num_adapters=len(workload.adapter_names()),
                   popularity=workload.popularity, alpha=workload.alpha, shared_prefix_len=workload.shared_prefix_len,
                   base_model=base)  # fmt: skip
    summary["records"] = [r.__dict__ for r in records]
    return summary
