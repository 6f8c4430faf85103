"""`lora-serve bench ...`: the benchmark subcommands (heavy imports happen inside cli_cmd). This file
holds the group and the commands for a running server and for adapter files; the others are in
engine_commands.py (the engine offline), base_commands.py (the base's matmuls), compose.py,
gpu_check_plan.py and structured.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliApp, CliSubCommand

from lora_serve.bench.base_commands import BenchMatmuls, BenchQuantization
from lora_serve.bench.command_base import BenchBase
from lora_serve.bench.compose import BenchCompose
from lora_serve.bench.engine_commands import BenchEngine, BenchLoRA, BenchPrefillStall, BenchPrefixCache, BenchThroughput
from lora_serve.bench.gpu_check_plan import BenchGPUCheck
from lora_serve.bench.serve_config import ClientConfig, WorkloadConfig
from lora_serve.bench.structured import BenchStructured


class BenchServe(WorkloadConfig, ClientConfig):
    """Drive a running server over HTTP with a seeded multi-adapter trace (S-LoRA's workload); TTFT, TPOT, ITL, goodput."""

    def cli_cmd(self) -> None:
        import asyncio
        import logging

        from lora_serve.bench import online, serve_results

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

        workload = WorkloadConfig(**{k: getattr(self, k) for k in WorkloadConfig.model_fields})
        client = ClientConfig(**{k: getattr(self, k) for k in ClientConfig.model_fields})
        results = asyncio.run(online.bench(workload, client))
        print(serve_results.report(results))
        if client.result_dir is not None:
            for path in serve_results.write(results, client.result_dir, client.label):
                print(f"# wrote {path}")


class BenchWriteAdapters(BaseModel):
    """Write random PEFT adapters <prefix>0 .. <prefix>{n-1} into a folder (serve them with --adapter-dir)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    out: str
    """Folder to write into (one sub-folder per adapter)."""

    model: str | None = None
    """Base model directory whose shapes the adapters fit (default: the embedded SmolLM2-135M-Instruct)."""

    num_adapters: int = Field(100, ge=1)
    """How many adapters."""

    prefix: str = "bench-"
    """Adapter name prefix."""

    rank: int = Field(16, ge=1)
    """LoRA rank."""

    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Projections adapted."""

    def cli_cmd(self) -> None:
        from pathlib import Path

        from lora_serve.bench.random_adapters import write_random_adapter
        from lora_serve.model.arch import ModelArch
        from lora_serve.model.default_model import resolve_model_path

        arch = ModelArch.from_dir(resolve_model_path(self.model))
        for i in range(self.num_adapters):
            write_random_adapter(Path(self.out) / f"{self.prefix}{i}", arch, self.rank, seed=i, targets=tuple(self.targets))
        print(f"# wrote {self.num_adapters} adapters of rank {self.rank} to {self.out}")


class BenchS3Load(BenchBase):
    """Registering an adapter from s3:// (download, validate), cold and from the ETag cache (needs the s3 extra)."""

    url: str
    """s3://bucket/prefix of the adapter (the AWS environment says where and how: AWS_ENDPOINT_URL, keys)."""

    write_rank: int | None = Field(None, ge=1)
    """First write a random adapter of this rank on all seven projections and upload it to --url."""

    repeats: int = Field(3, ge=1)
    """Cold and warm registrations, each repeat with an empty cache and a fresh engine (medians reported)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import s3_load

        model_path = self.setup()
        if self.write_rank is not None:
            size = s3_load.upload_random_adapter(self.url, model_path, self.write_rank, self.seed)
            print(f"# uploaded a rank-{self.write_rank} adapter to {self.url}: {size / 1e6:.1f} MB")
        print(s3_load.report(s3_load.run(model_path, self.url, self.repeats)))


class BenchCommand(BaseModel):
    """Benchmarks, measured side by side in one run (ratios are what to compare across machines)."""

    throughput: CliSubCommand[BenchThroughput]
    """Engine vs transformers generate."""

    lora: CliSubCommand[BenchLoRA]
    """Mixed adapters vs base, and vs PEFT."""

    engine: CliSubCommand[BenchEngine]
    """Offline: the number of distinct adapters swept, base / merged / unmerged, vs base (and PEFT)."""

    prefill_stall: CliSubCommand[BenchPrefillStall]
    """Streams' inter-token latency while a long prompt is prefilled, per prefill chunk size."""

    prefix_cache: CliSubCommand[BenchPrefixCache]
    """Prefix caching: TTFT and throughput cold vs warm behind a long shared system prompt."""

    serve: CliSubCommand[BenchServe]
    """Online: a running server under a seeded multi-adapter trace."""

    write_adapters: CliSubCommand[BenchWriteAdapters]
    """Random adapters for `bench serve` (PEFT format)."""

    gpu_check: CliSubCommand[BenchGPUCheck]
    """The fused LoRA kernels and their throughput at Llama shapes (random weights; made for a CUDA machine)."""

    structured: CliSubCommand[BenchStructured]
    """Structured outputs: what constrained rows cost the free rows of their batch, over several adapters."""

    matmuls: CliSubCommand[BenchMatmuls]
    """A step's base matmuls: torch vs the CPU kernels, beside this machine's bandwidth floor."""

    s3_load: CliSubCommand[BenchS3Load]
    """Loading an adapter from s3://: downloaded, then found in the ETag cache."""
    compose: CliSubCommand[BenchCompose]
    """Weighted composition: a decode batch where some rows compose two adapters vs one adapter per row."""
    quantization: CliSubCommand[BenchQuantization]
    """The quantized base (int8, int4) vs float32: a step's matmuls and the engine's decode tok/s."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)
