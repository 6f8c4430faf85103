"""`bench serve` end to end: a live in-process server on the tiny model with three random adapters."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path

import httpx
import pytest

from lora_serve.bench import online, serve_results
from lora_serve.bench.random_adapters import write_random_adapter
from lora_serve.bench.serve_config import ClientConfig, WorkloadConfig
from lora_serve.config import ServerConfig
from lora_serve.model.arch import ModelArch
from tests.api.adapter_helpers import tiny_engine_with
from tests.api.live_server import live_server

VLLM_KEYS = [
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
    "total_token_throughput", "request_goodput",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90", "p99")),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter_dir = tmp_path_factory.mktemp("bench-adapters")
    arch = ModelArch.from_dir(tiny_llama_dir)
    for i in range(3):
        write_random_adapter(adapter_dir / f"bench-{i}", arch, rank=4, seed=i)
    with tiny_engine_with(tiny_llama_dir, adapter_dir, max_loras=2) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny")) as live:
            yield live


def test_online_run_completes_every_request_exactly(server, tmp_path: Path):
    workload = WorkloadConfig(
        adapter_prefix="bench-", num_adapters=3, alpha=0.5, request_rate=[50.0, float("inf")], concurrency=4,
        input_len=[8, 24], output_len=[3, 9], num_requests=12, seed=7,
    )  # fmt: skip
    client = ClientConfig(url=server.base_url, with_base=True, rounds=2, goodput=["ttft:60000"], result_dir=tmp_path, progress=False)
    results = asyncio.run(online.bench(workload, client))

    trace = list(online.make_trace(workload, client.vocab_size))
    inf = float("inf")
    assert [(r["request_rate"], r["round"], r["target"]) for r in results] == [
        (50.0, 0, "adapters"), (50.0, 0, "base"), (50.0, 1, "adapters"), (50.0, 1, "base"),
        (inf, 0, "adapters"), (inf, 0, "base"), (inf, 1, "adapters"), (inf, 1, "base"),
    ]  # fmt: skip
    for r in results:
        assert not [k for k in VLLM_KEYS if k not in r]
        assert r["errors"] == [] and r["completed"] == r["num_prompts"] == 12
        assert r["total_output_tokens"] == sum(s.output_len for s in trace)
        assert r["total_input_tokens"] == sum(s.input_len for s in trace)
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])
        assert {x["index"]: x["output_tokens"] for x in r["records"]} == {s.index: s.output_len for s in trace}
        assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"]
        # Every round, and the warm-up, has prompts of its own: none is served from the prefix cache.
        assert [x["cached_tokens"] for x in r["records"]] == [0] * 12
    assert {x["model"] for x in results[0]["records"]} <= {"bench-0", "bench-1", "bench-2"}
    assert {x["model"] for x in results[1]["records"]} == {"tiny"}
    ratios = serve_results.base_ratios(results)
    assert [(r["request_rate"], r["rounds"]) for r in ratios] == [(50.0, 2), (inf, 2)]
    assert all(lo <= r["total_token_throughput"] <= hi for r in ratios for lo, hi in [r["total_token_throughput_range"]])

    paths = serve_results.write(results, tmp_path, "t")
    assert json.loads((tmp_path / "t-adapters-rateinf-round0.json").read_text())["request_rate"] == "inf"
    assert {p.name for p in paths if p.suffix == ".png"} == {"t-latency-cdf.png", "t-latency-vs-rate.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    assert "adapters / base" in serve_results.report(results)


def test_shared_prefix_run_splits_ttft_into_cold_and_warm(server):
    """One client, so each adapter's first request finds nothing cached and every later one finds its
    system prompt's full blocks (40 + 4 tokens: 2 blocks of 16)."""
    workload = WorkloadConfig(
        adapter_prefix="bench-", num_adapters=3, alpha=0.5, concurrency=1, shared_prefix_len=40, input_len=[4], output_len=[2],
        num_requests=9, seed=11,
    )  # fmt: skip
    (result,) = asyncio.run(online.bench(workload, ClientConfig(url=server.base_url, progress=False)))

    trace = list(online.make_trace(workload, 32000))
    first = {s.adapter: s.index for s in reversed(trace)}
    records = sorted(result["records"], key=lambda x: x["index"])
    assert result["errors"] == [] and [x["input_len"] for x in records] == [44] * 9
    assert [x["cached_tokens"] for x in records] == [0 if s.index in first.values() else 32 for s in trace]
    assert (result["num_cold"], result["num_warm"]) == (len(first), 9 - len(first))
    assert result["mean_cached_fraction"] == pytest.approx((9 - len(first)) * 32 / 44 / 9)
    cold = [x["ttft_s"] * 1000 for x in records if x["cached_tokens"] == 0]
    assert result["median_ttft_cold_ms"] == pytest.approx(statistics.median(cold))
    assert result["p99_ttft_cold_ms"] >= result["median_ttft_cold_ms"] > 0 and result["median_ttft_warm_ms"] > 0
    assert "cold TTFT ms med/p99" in serve_results.report([result])


def test_unknown_adapter_is_an_error_not_a_crash(server):
    workload = WorkloadConfig(adapters=["nope"], input_len=[4], output_len=[2], num_requests=2)
    results = asyncio.run(online.bench(workload, ClientConfig(url=server.base_url, progress=False)))
    assert results[0]["completed"] == 0 and results[0]["failed"] == 2
    assert "HTTP 404" in results[0]["errors"][0]


def _run(target: str, latencies: list[tuple[float, float]], duration: float = 10.0) -> dict:
    """A run of 9-token replies with these (TTFT, TPOT) seconds: E2E = TTFT + 8 x TPOT."""
    records = [{"ttft_s": ttft, "e2el_s": ttft + 8 * tpot, "output_tokens": 9, "error": None} for ttft, tpot in latencies]
    return {"target": target, "request_rate": 1.0, "round": 0, "duration": duration, "records": records,
            "total_token_throughput": 1.0, "output_throughput": 1.0, "median_tpot_ms": 1.0, "median_ttft_ms": 1.0}  # fmt: skip


def test_goodput_vs_base_counts_requests_within_twice_the_base_medians() -> None:
    # The base's medians: TTFT 1.0 s, TPOT 0.1 s, so the SLO is TTFT <= 2.0 s and TPOT <= 0.2 s.
    base = _run("base", [(0.5, 0.05), (1.0, 0.1), (1.5, 0.3)])  # the last misses the TPOT bound: 2 good
    adapters = _run("adapters", [(1.9, 0.19), (2.1, 0.1), (0.5, 0.25), (1.99, 0.199)])  # 2 good: the first and the last
    (ratio,) = serve_results.base_ratios([adapters, base])
    assert ratio["goodput_vs_base"] == pytest.approx((2 / 10) / (2 / 10))
    slower = _run("adapters", [(1.9, 0.19), (3.0, 0.1)], duration=20.0)  # 1 good in twice the time
    (ratio,) = serve_results.base_ratios([slower, base])
    assert ratio["goodput_vs_base"] == pytest.approx((1 / 20) / (2 / 10))


def test_llama_cpp_mode_names_the_base_and_the_adapter_in_llama_cpps_field() -> None:
    """With --llama-cpp-loras, a request for adapter i names the base model and carries `lora: [{id: i, scale: 1}]`
    (llama-server's per-request adapters); base requests carry no `lora`. A stand-in server records the bodies."""
    bodies: list[dict] = []

    def llama_server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        n = body["max_tokens"]
        chunks = [{"choices": [{"index": 0, "text": "x"}]}] * n + [{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": n}}]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    names = ["french", "json", "pirate"]
    cfg = ClientConfig(url="http://llama", base_model="smollm2", llama_cpp_loras=names, progress=False)
    workload = WorkloadConfig(adapters=names, popularity="uniform", num_requests=12, input_len=[4], output_len=[3], concurrency=4)
    trace = list(online.make_trace(workload, cfg.vocab_size))

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=cfg.url, transport=httpx.MockTransport(llama_server)) as client:
            return [await online._measure(client, workload, cfg, trace, math.inf, target, "smollm2", 0) for target in ("adapters", "base")]

    adapters, base = asyncio.run(run())
    assert adapters["completed"] == base["completed"] == 12
    sent, base_sent = bodies[:12], bodies[12:]
    assert all(b["model"] == "smollm2" for b in bodies)
    assert sorted(b["lora"][0]["id"] for b in sent) == sorted(names.index(str(spec.adapter)) for spec in trace)
    assert all(b["lora"] == [{"id": b["lora"][0]["id"], "scale": 1.0}] for b in sent)
    assert not any("lora" in b for b in base_sent)
    # A usage without prompt_tokens_details (this stand-in's): no request is counted cold or warm.
    assert (adapters["num_cold"], adapters["num_warm"], adapters["mean_cached_fraction"], adapters["median_ttft_cold_ms"]) == (
        0,
        0,
        None,
        None,
    )
    with pytest.raises(ValueError, match="not in --llama-cpp-loras"):
        cfg.extra_body("unknown")
