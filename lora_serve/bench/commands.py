"""`lora-serve bench ...`: the benchmark subcommands (heavy imports happen inside cli_cmd)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import CliApp, CliSubCommand, CliVariadicArg

from lora_serve.bench.command_base import BenchBase
from lora_serve.bench.compose import BenchCompose
from lora_serve.bench.gpu_check_plan import BenchGPUCheck
from lora_serve.bench.serve_config import ClientConfig, WorkloadConfig
from lora_serve.bench.structured import BenchStructured


class BenchThroughput(BenchBase):
    """Engine token throughput vs transformers' generate (one at a time, and one padded batch)."""

    concurrency: list[int] = [1, 8, 32]
    """Numbers of concurrent requests to measure."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import throughput

        rows = throughput.run(self.setup(), self.concurrency, self.seed)
        print(throughput.report(rows))


class BenchLoRA(BenchBase):
    """Mixed-adapter batches vs the bare base, and vs HF PEFT's mixed batch (adapter_names)."""

    num_seqs: int = 32
    """Sequences in the batch."""

    num_adapters: int = 32
    """Distinct adapters among them (random, PEFT format)."""

    rank: int = 16
    """Adapter rank (all seven projections are targeted)."""

    prompt_len: int = 64
    """Prompt tokens per sequence."""

    decode_steps: int = 16
    """Decode steps timed after the prefill step."""

    repeats: int = 3
    """Alternating base/mixed repetitions (medians are reported)."""

    peft: bool = True
    """Also run the workload through HF PEFT."""

    max_lora_rank: int | None = Field(None, ge=1)
    """The engine's --max-lora-rank (slot width; default: --rank). `lora-serve serve` defaults to 64."""

    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Adapter weight dtype in the slots (serve's --lora-dtype; auto as there)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import mixed_lora

        result = mixed_lora.run(
            self.setup(),
            self.num_seqs,
            self.num_adapters,
            self.rank,
            self.prompt_len,
            self.decode_steps,
            self.repeats,
            self.peft,
            self.seed,
            self.max_lora_rank,
            self.lora_dtype,
        )
        print(mixed_lora.report(result, self.num_adapters))


class BenchPrefillStall(BenchBase):
    """What a long prompt arriving mid-stream does to the inter-token latency of the streams decoding, per prefill chunk size."""

    num_streams: int = Field(16, ge=1)
    """Sequences decoding when the long prompt arrives."""

    long_prompt_len: int = Field(4000, ge=1)
    """Tokens of the prompt that arrives."""

    chunks: CliVariadicArg[list[int]] = [0, 2048, 512, 128]
    """--long-prefill-token-threshold values to compare (0: the whole prompt in one step)."""

    warm_steps: int = Field(16, ge=2)
    """Decode steps timed before the long prompt arrives."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import prefill_stall

        rows = prefill_stall.run(
            self.setup(), self.num_streams, self.long_prompt_len, tuple(self.chunks), warm_steps=self.warm_steps, seed=self.seed
        )
        print(prefill_stall.report(rows, self.long_prompt_len))


class BenchPrefixCache(BenchBase):
    """Prefix caching cold vs warm: requests behind one long shared system prompt, on the base and on adapters."""

    system_len: int = Field(1024, ge=1)
    """Tokens of the system prompt every request starts with."""

    question_len: int = Field(32, ge=1)
    """Tokens of each request's own question after it."""

    num_requests: int = Field(16, ge=1)
    """Requests per round, submitted at once."""

    num_adapters: int = Field(2, ge=0)
    """Random adapters the requests are spread over, round-robin with the base."""

    rank: int = Field(16, ge=1)
    """Adapter rank (all seven projections)."""

    max_tokens: int = Field(16, ge=1)
    """Greedy output tokens per request."""

    repeats: int = Field(3, ge=1)
    """Rounds per mode, cold and warm alternating (medians are reported)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import prefix_cache

        rows = prefix_cache.run(
            self.setup(), self.system_len, self.question_len, self.num_requests, self.num_adapters, self.rank,
            self.max_tokens, self.repeats, self.seed,
        )  # fmt: skip
        print(prefix_cache.report(rows))


class BenchEngine(BenchBase):
    """Offline: prefill, decode and whole-run throughput vs the number of distinct adapters (base / merged / unmerged, interleaved)."""

    num_adapters_list: CliVariadicArg[list[int]] = [1, 8, 32, 128]
    """Numbers of distinct adapters to sweep."""

    num_seqs: int = Field(128, ge=1)
    """Sequences per batch (all submitted at once); at least the largest N, so that every adapter has one."""

    rank: int = Field(16, ge=1)
    """Adapter rank."""

    targets: CliVariadicArg[list[str]] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Projections the random adapters adapt."""

    max_loras: int | None = Field(None, ge=1)
    """Most adapters resident at once (default: no cap, as the server; fewer than N makes the engine rotate them)."""

    prompt_len: int = Field(32, ge=1)
    """Prompt tokens per sequence."""

    decode_steps: int = Field(16, ge=1)
    """Output tokens after the first, per sequence."""

    repeats: int = Field(3, ge=1)
    """Interleaved rounds after the warm-up (medians are reported)."""

    peft: bool = False
    """Also run each N through HF PEFT (adapter_names, one padded batch)."""

    result_dir: str | None = None
    """Folder for the JSON rows and the ratio plot."""

    @model_validator(mode="after")
    def _check_sweep(self) -> BenchEngine:
        if self.num_seqs < max(self.num_adapters_list):
            raise ValueError(
                f"--num-seqs ({self.num_seqs}) must be >= the largest of --num-adapters-list, so that every adapter has a sequence"
            )
        return self

    def cli_cmd(self) -> None:
        from pathlib import Path

        from lora_serve.bench import engine_sweep

        rows = engine_sweep.sweep(
            self.setup(), self.num_adapters_list, self.num_seqs, self.rank, tuple(self.targets), self.max_loras,
            self.prompt_len, self.decode_steps, self.repeats, self.peft, self.seed,
        )  # fmt: skip
        print(engine_sweep.report(rows))
        if self.result_dir:
            for path in engine_sweep.write(rows, Path(self.result_dir), "engine-sweep"):
                print(f"# wrote {path}")


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


class BenchMatmuls(BenchBase):
    """The base's projections and LM head: torch's F.linear vs the CPU kernels, beside the bandwidth floor."""

    rows: CliVariadicArg[list[int]] = [1, 8, 32, 128, 256]
    """Rows (tokens in the step) to time."""

    repeats: int = Field(5, ge=1)
    """Alternating torch/kernels rounds after a warm-up round (medians reported)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import matmuls

        print(matmuls.report(matmuls.run(self.setup(), self.rows, self.repeats)))


class BenchQuantization(BenchBase):
    """The quantized base (--quantization int8|int4) vs float32: a step's matmuls, then engine decode tok/s."""

    rows: CliVariadicArg[list[int]] = [1, 8, 16, 64]
    """Rows (tokens in the step) to time the matmuls at (torch's weight-only ops only up to 16)."""

    batch: CliVariadicArg[list[int]] = [1, 8]
    """Decode batch sizes (sequences decoding together)."""

    prompt_len: int = Field(64, ge=1)
    """Prompt tokens of each sequence."""

    decode_steps: int = Field(32, ge=1)
    """Decode steps timed per round (the median step counts)."""

    repeats: int = Field(3, ge=1)
    """Rounds alternating the schemes (medians reported)."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import quantization as q

        path = self.setup()
        matmuls = q.run_matmuls(path, self.rows, self.repeats)
        decode = q.run_decode(path, self.batch, self.prompt_len, self.decode_steps, self.repeats, self.seed)
        print(q.report(matmuls, decode))


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
