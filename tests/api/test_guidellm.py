"""guidellm, the load generator people point at OpenAI-compatible servers, unmodified, against a live server.

It streams chat completions with vLLM's extensions (`ignore_eos`, `stream_options.continuous_usage_stats`)
and counts tokens from the server's usage. A run on the base and one on an adapter must finish every
request without an error, each with exactly the tokens asked for, as the server's own metrics count them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.adapter_helpers import modules_server
from tests.api.live_server import LiveServer

pytest.importorskip("guidellm")

NUM_REQUESTS = 6
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, peft_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with modules_server(tiny_llama_dir, peft_paths, tmp_path_factory.mktemp("store")) as server:
        yield server


def _completed_requests(live: LiveServer, adapter: str) -> float:
    text = httpx.get(f"{live.base_url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "lora_serve_requests")
    return sum(s.value for s in family.samples if s.name == "lora_serve_requests_total" and s.labels["adapter"] == adapter)


@pytest.mark.parametrize("model", ["tiny", "r8-all"])
def test_guidellm_run_completes_every_request(live: LiveServer, tiny_llama_dir: Path, tmp_path: Path, model: str) -> None:
    report = tmp_path / "report.json"
    before = _completed_requests(live, "" if model == "tiny" else model)
    run = subprocess.run(
        [
            sys.executable, "-m", "guidellm", "run",
            f"--backend=kind=openai_http,target={live.base_url},model={model}",
            "--profile=kind=concurrent,streams=3",
            f"--constraint=kind=max_requests,count={NUM_REQUESTS}",
            f"--data=kind=synthetic_text,prompt_tokens=24,output_tokens={OUTPUT_TOKENS}",
            f"--tokenizer=kind=hf_auto,model={tiny_llama_dir}",  # the tiny model's own tokenizer files: nothing to download
            f"--output=kind=json,path={report}",
            "--disable-console",
        ],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    requests = json.loads(report.read_text())["benchmarks"][0]["requests"]
    assert (len(requests["successful"]), len(requests["errored"]), len(requests["incomplete"])) == (NUM_REQUESTS, 0, 0)
    assert [r["output_tokens"] for r in requests["successful"]] == [OUTPUT_TOKENS] * NUM_REQUESTS
    assert all(r["prompt_tokens"] > 24 for r in requests["successful"])  # the prompt, in the chat template
    assert _completed_requests(live, "" if model == "tiny" else model) - before == NUM_REQUESTS
