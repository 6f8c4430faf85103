"""GET /metrics: vLLM's routing series and lora-serve's per-adapter series, with their types and labels."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import adapter_files, make_tiny_adapters, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"))
    modules = [f"{name}={path}" for name, path in paths.items()]
    with tiny_engine_with(tiny_llama_dir, tmp_path_factory.mktemp("store"), lora_modules=modules, max_loras=2) as engine:
        with live_server(engine, ServerConfig(served_model_name="tiny")) as live:
            yield live


def scrape(server: LiveServer) -> dict:
    r = httpx.get(f"{server.base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family, name: str | None = None) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if name is None or s.name == name}


def test_metrics_carry_routing_and_per_adapter_series(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    for model, n in [("r4-attn", 5), ("r4-attn", 3), ("tiny", 4)]:
        client.completions.create(model=model, prompt="Hello there", max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    m = scrape(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
        assert m[name].type == "gauge", name
    assert samples(m["vllm:num_requests_running"]) == {(): 0.0}
    info = m["vllm:lora_requests_info"].samples[0].labels
    assert info == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}
    assert m["lora_serve_requests"].type == "counter"
    assert samples(m["lora_serve_requests"], "lora_serve_requests_total") == {
        (("adapter", "r4-attn"), ("finish_reason", "length")): 2.0,
        (("adapter", ""), ("finish_reason", "length")): 1.0,
    }
    completion = samples(m["lora_serve_tokens"], "lora_serve_tokens_total")
    assert completion[(("adapter", "r4-attn"), ("kind", "completion"))] == 8.0
    assert m["lora_serve_time_to_first_token_seconds"].type == "histogram"
    ttft_count = samples(m["lora_serve_time_to_first_token_seconds"], "lora_serve_time_to_first_token_seconds_count")
    assert ttft_count == {(("adapter", "r4-attn"),): 2.0, (("adapter", ""),): 1.0}
    tpot_count = samples(m["lora_serve_time_per_output_token_seconds"], "lora_serve_time_per_output_token_seconds_count")
    assert tpot_count[(("adapter", "r4-attn"),)] == 2.0
    residency = samples(m["lora_serve_adapter_residency"])
    assert residency[(("adapter", "r4-attn"), ("tier", "device"))] == 1.0
    assert {dict(k)["adapter"] for k in residency} == {"r4-attn", "r8-all", "r2-mlp"}
    assert m["lora_serve_adapter_evictions"].type == "counter"
    assert samples(m["lora_serve_merge_policy_switches"], "lora_serve_merge_policy_switches_total") == {
        (("action", "merge"),): 0.0,
        (("action", "unmerge"),): 0.0,
    }


def test_prompt_tokens_count_once_per_prompt_as_in_usage(server: LiveServer) -> None:
    """n choices share their prompt: /metrics counts its tokens once, as usage does; completions once per choice."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

    def tokens(kind: str) -> float:
        return samples(scrape(server)["lora_serve_tokens"], "lora_serve_tokens_total").get((("adapter", "r8-all"), ("kind", kind)), 0.0)

    before_prompt, before_completion = tokens("prompt"), tokens("completion")
    resp = client.completions.create(
        model="r8-all", prompt=["Hello there", "A longer prompt than the first one"], n=3, max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert len(resp.choices) == 6
    assert tokens("prompt") - before_prompt == resp.usage.prompt_tokens
    assert tokens("completion") - before_completion == resp.usage.completion_tokens == 12


def test_running_and_waiting_adapters_show_while_streams_run(server: LiveServer) -> None:
    """The engine thread is held after the step that starts the stream, so nothing can move."""
    engine = server.engine.engine
    paused, resume = threading.Event(), threading.Event()
    step = engine.step

    def step_then_hold():
        outputs = step()
        if engine.num_running() and not paused.is_set():
            paused.set()
            resume.wait(30)
        return outputs

    engine.step = step_then_hold
    body = {"model": "r8-all", "prompt": "Hi", "max_tokens": 20}
    running = threading.Thread(target=httpx.post, args=(f"{server.base_url}/v1/completions",), kwargs={"json": body, "timeout": 60})
    waiting = threading.Thread(
        target=httpx.post, args=(f"{server.base_url}/v1/completions",), kwargs={"json": {**body, "model": "r2-mlp"}, "timeout": 60}
    )
    try:
        running.start()
        assert paused.wait(30)
        waiting.start()
        deadline = time.monotonic() + 10
        while scrape(server)["vllm:num_requests_waiting"].samples[0].value < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        m = scrape(server)
    finally:
        resume.set()
        del engine.step
        running.join(30)
        waiting.join(30)
    info = m["vllm:lora_requests_info"].samples[0].labels
    assert info["running_lora_adapters"] == "r8-all"
    assert info["waiting_lora_adapters"] == "r2-mlp"
    assert m["vllm:num_requests_running"].samples[0].value == 1.0
    assert m["vllm:num_requests_waiting"].samples[0].value == 1.0
    assert 0 < m["vllm:kv_cache_usage_perc"].samples[0].value < 1


def test_adapter_loads_count_every_read_from_disk(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """One CPU copy at most, so registering one adapter evicts the other and a request reads it again."""
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path / "peft")
    lora = {
        "lora_modules": [f"r4-attn={paths['r4-attn']}"],
        "allowed_lora_dir": [tmp_path / "peft"],
        "max_loras": 1,
        "max_cpu_loras": 1,
    }

    def loads() -> tuple[float, float]:
        m = scrape(live)
        return m["lora_serve_adapter_loads"].samples[0].value, m["lora_serve_adapter_load_seconds"].samples[0].value

    def complete(model: str) -> None:
        body = {"model": model, "prompt": "hi", "max_tokens": 1}
        assert httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=30).status_code == 200

    with tiny_engine_with(tiny_llama_dir, tmp_path / "store", **lora) as engine, live_server(engine, ServerConfig()) as live:
        assert loads()[0] == 1  # --lora-modules, at start
        assert upload(live.base_url, "uploaded", adapter_files(paths["r8-all"])).status_code == 201
        assert loads()[0] == 2
        body = {"lora_name": "by-path", "lora_path": str(paths["r2-mlp"])}
        assert httpx.post(f"{live.base_url}/v1/load_lora_adapter", json=body, timeout=30).status_code == 200
        assert loads()[0] == 3
        complete("r4-attn")  # evicted from CPU by the two registrations: read again
        assert loads()[0] == 4
        complete("r4-attn")  # still in CPU memory
        count, seconds = loads()
    assert count == 4 and seconds > 0


def test_a_deleted_adapters_series_go_with_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Adapters uploaded and deleted under traffic leave no per-adapter series behind (they would pile up)."""
    _, paths = make_tiny_adapters(tiny_llama_dir, tmp_path / "peft")

    def adapters_in_series() -> set[str]:
        families = scrape(live)
        return {s.labels["adapter"] for f in families.values() for s in f.samples if s.labels.get("adapter")}

    with tiny_engine_with(tiny_llama_dir, tmp_path / "store") as engine, live_server(engine, ServerConfig()) as live:
        for name in ("kept", "churn-1", "churn-2"):
            assert upload(live.base_url, name, adapter_files(paths["r4-attn"])).status_code == 201
            body = {"model": name, "prompt": "hi", "max_tokens": 2}
            assert httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=30).status_code == 200
        assert adapters_in_series() == {"kept", "churn-1", "churn-2"}
        for name in ("churn-1", "churn-2"):
            assert httpx.delete(f"{live.base_url}/v1/adapters/{name}", timeout=30).status_code == 200
        assert adapters_in_series() == {"kept"}
        assert scrape(live)["lora_serve_requests"].samples  # the base's and kept's series stay
