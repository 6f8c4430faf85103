"""Prometheus metrics on GET /metrics.

Two kinds of series, on a registry of the app's own (no process-wide state):
- read from the engine at scrape time (`EngineCollector`): the series Kubernetes' Gateway
  API Inference Extension reads to route LoRA traffic, under vLLM's names
  (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
  `vllm:lora_requests_info`, `vllm:prefix_cache_queries`, `vllm:prefix_cache_hits`), the same two
  counters per adapter (`lora_serve_prefix_cache_queries`, `lora_serve_prefix_cache_hits`: their
  ratio is an adapter's hit rate), and lora-serve's adapter cache state (residency per tier, loads,
  evictions, load time, merges);
- recorded per finished request (`RequestMetrics`): requests, tokens, time to first token
  and time per output token, each labelled with the adapter ("" for the base model).
Once any key is configured, the route needs the metrics key or an admin key (auth.py): the
labels name every tenant's adapters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lora_serve.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine

# Seconds; CPU decode steps of small models sit near 0.05-0.5 s, GPU ones near 0.005-0.05 s.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineCollector:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        e, catalog = self.engine, self.engine.adapters
        running, waiting = e.adapters_in_flight()
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", value=e.num_running())
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run.", value=e.num_waiting())
        kv = e.engine.kv_cache
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means full.", value=kv.usage)
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", value=kv.num_prefix_queries)
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", value=kv.num_prefix_hits)
        yield from prefix_cache_by_adapter(kv.prefix_counts_by_adapter)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (value: the time of the scrape).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(sorted(running)), ",".join(sorted(waiting)), str(catalog.max_loras or 0)], time.time())
        yield info
        residency = GaugeMetricFamily("lora_serve_adapter_residency", "1 for the tier each adapter is in now.", labels=["adapter", "tier"])
        for record in catalog.list():
            residency.add_metric([record.name, catalog.location(record.name)], 1)
        yield residency
        merged = GaugeMetricFamily("lora_serve_adapter_merged", "1 for the adapter merged into the base.", labels=["adapter"])
        if catalog.merged_name is not None:
            merged.add_metric([catalog.merged_name], 1)
        yield merged
        loads = (
            "Adapter folders read from disk into CPU memory and validated: one per registration (start-up, upload, "
            "load API, a folder another replica stored) and one per re-read after eviction from the CPU cache."
        )
        yield CounterMetricFamily("lora_serve_adapter_loads", loads, value=catalog.num_loads)
        yield CounterMetricFamily("lora_serve_adapter_load_seconds", "Time spent in those loads.", value=catalog.load_seconds)
        yield CounterMetricFamily(
            "lora_serve_adapter_evictions", "Adapters evicted from a device slot or the CPU cache.", value=catalog.num_evictions
        )
        yield CounterMetricFamily("lora_serve_adapter_merges", "Adapters merged into the base weights.", value=catalog.num_merges)
        policy = e.engine.merge_policy
        switches = CounterMetricFamily("lora_serve_merge_policy_switches", "Automatic merge policy decisions.", labels=["action"])
        for action in ("merge", "unmerge"):
            switches.add_metric([action], policy.decisions[action] if policy else 0)
        yield switches


def prefix_cache_by_adapter(counts: dict[str, tuple[int, int]]) -> Iterator[CounterMetricFamily]:
    """KVCache.prefix_counts_by_adapter as two counters labelled with the adapter ("" for the base),
    counted at admission as vLLM's totals are; an adapter's hit rate is the ratio of their rates."""
    queries = CounterMetricFamily(
        "lora_serve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, per adapter.", labels=["adapter"]
    )
    hits = CounterMetricFamily("lora_serve_prefix_cache_hits", "Prompt tokens found in the prefix cache, per adapter.", labels=["adapter"])
    for name, (num_queries, num_hits) in list(counts.items()):  # one C-level copy: the engine thread adds names
        queries.add_metric([name], num_queries)
        hits.add_metric([name], num_hits)
    yield queries
    yield hits


class RequestMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        labels = ["adapter"]
        self.requests = Counter("lora_serve_requests", "Finished requests.", [*labels, "finish_reason"], registry=self.registry)
        self.tokens = Counter("lora_serve_tokens", "Tokens processed.", [*labels, "kind"], registry=self.registry)
        self.ttft = Histogram(
            "lora_serve_time_to_first_token_seconds", "Arrival to first token.", labels, buckets=TTFT_BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "lora_serve_time_per_output_token_seconds", "Mean gap between output tokens after the first.", labels,
            buckets=TPOT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(EngineCollector(engine))

    def observe(self, adapter: str | None, start: float, first: float, end: float, last: RequestOutput, count_prompt: bool = True) -> None:
        """One finished choice: perf_counter times of arrival, first token and end. count_prompt: whether its
        prompt tokens count (once per prompt, as in usage: False for the other choices of n > 1)."""
        name = adapter or ""
        self.requests.labels(name, last.finish_reason or "").inc()
        if count_prompt:
            self.tokens.labels(name, "prompt").inc(last.num_prompt_tokens)
        self.tokens.labels(name, "completion").inc(last.num_output_tokens)
        self.ttft.labels(name).observe(first - start)
        if last.num_output_tokens > 1:
            self.tpot.labels(name).observe((end - first) / (last.num_output_tokens - 1))

    def forget(self, adapter: str) -> None:
        """Drop an unregistered adapter's series: names come and go under traffic (uploads, deletions),
        and a series kept for each would grow the registry, and every scrape, without bound."""
        for metric in (self.requests, self.tokens, self.ttft, self.tpot):
            metric.remove_by_labels({"adapter": adapter})

    def render(self) -> bytes:
        return generate_latest(self.registry)
