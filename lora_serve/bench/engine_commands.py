"""`lora-serve bench throughput | lora | engine | prefill-stall | prefix-cache`: the engine measured
offline, in one process, against transformers and HF PEFT (heavy imports happen inside cli_cmd)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import CliVariadicArg

from lora_serve.bench.command_base import BenchBase


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
    """--long-prefill-token-threshold values to compare, without pacing (0: the whole prompt in one step)."""

    stalls: CliVariadicArg[list[float]] = [2.0]
    """--max-prefill-stall values to compare (the server's default: 2), each with the default step budget."""

    num_long_prompts: int = Field(1, ge=1)
    """Long prompts arriving together (a queue of them: how long the last waits for its first token)."""

    warm_steps: int = Field(16, ge=2)
    """Decode steps timed before the long prompt arrives."""

    def cli_cmd(self) -> None:
        from lora_serve.bench import prefill_stall

        rows = prefill_stall.run(
            self.setup(),
            self.num_streams,
            self.long_prompt_len,
            tuple(self.chunks),
            warm_steps=self.warm_steps,
            seed=self.seed,
            stalls=tuple(self.stalls),
            num_long_prompts=self.num_long_prompts,
        )
        print(prefill_stall.report(rows, self.long_prompt_len, self.num_long_prompts))


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
