"""Typed configuration for lora-serve.

One model per concern: `ModelConfig` (which base, dtype, device), `CacheConfig`
(KV cache budget), `SchedulerConfig` (batch limits), `LoRAConfig` (adapter
slots and sources), `ServerConfig` (HTTP), `RayConfig` (replicas on Ray Serve).
`EngineConfig` groups the first four.
Every field has a docstring: `lora-serve serve --help` prints them (`serve-ray` adds
RayConfig's), and each field is also read from a `LORA_SERVE_<FIELD>` environment
variable (see cli.py). LoRAConfig is in lora_config.py, and the field types and
helpers the configs share in config_fields.py.
Cross-field rules are checked when the config is built and raise ValueError.
"auto" and unset defaults are resolved for the machine and model in one place,
engine/resolve.py, and logged at start; below the engine only resolved values are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .config_fields import ConfigBase, CPUKernels, Device, Dtype, Quantization
from .lora_config import LoRAConfig


class ModelConfig(ConfigBase):
    model: str | None = None
    """Base model: a local Hugging Face directory of a Llama-family causal LM
    (Llama 3.x, Qwen2/2.5, Mistral, SmolLM). Empty: the embedded SmolLM2-135M-Instruct."""

    dtype: Dtype = "auto"
    """Base weight dtype. auto: float32 on CPU, bfloat16 on CUDA."""

    device: Device = "auto"
    """auto: CUDA when available, else CPU."""

    seed: int = 0
    """Seed for requests that give none (each such request draws its own seed from this stream)."""

    num_threads: int | None = None
    """CPU threads for torch (default: torch's own choice, usually one per core)."""

    cpu_kernels: CPUKernels = "auto"
    """Hand-written matmuls for small batches on CPU (model/cpu_kernels.c): the base's projections and
    LM head while a step has at most 64 rows, and float16 adapters. Built at start with the machine's
    C compiler (cc); about 2x torch's matmuls at decode batches of 1-8 rows on an AVX2 EPYC, less where
    MKL has AVX-512. auto: used when they build on this CPU (x86-64 with AVX2, FMA and F16C), else
    torch's matmuls, and the start log says why; the base's matmuls go to them only at the step sizes
    where they beat torch's here, measured at the first start on a machine (~2 s, then cached;
    model/kernel_rows.py); on: refuse to start without them, and use them at every step size up to
    64 rows; off: torch's matmuls only. Not used on CUDA."""

    quantization: Quantization | None = None
    """Weight-only quantization of the base, done at load time (model/quantized_weight.py): int8, per
    output channel; int4, per group of 32 inputs with a scale and a minimum (as llama.cpp's Q4_1).
    Every projection and the LM head are quantized; the embedding, the norms, the activations, the KV
    cache and the adapters stay at full precision, so each adapter's delta is added exactly as without
    it. Steps of up to 64 rows run on the CPU kernels (cpu_kernels); larger ones dequantize each weight
    for torch's matmul (without the kernels, every step does, and is slower than float32). CPU only.
    Adapters cannot be merged into a quantized base (merge, merge_policy and the merge endpoint are
    refused). None: the base in `dtype`."""


class CacheConfig(ConfigBase):
    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV-cache block."""

    kv_cache_memory_gb: float = Field(2.0, gt=0)
    """Memory for the preallocated KV cache, in GiB. When it is full, new requests wait."""

    enable_prefix_caching: bool = True
    """Automatic prefix caching: reuse the KV of full blocks an earlier request computed for the same
    leading tokens with the same weights (the base, or an adapter identified by the sha256 of its weights
    and config, never by its name); freed blocks stay cached until their memory is needed."""


class SchedulerConfig(ConfigBase):
    max_num_seqs: int = Field(64, ge=1)
    """Most sequences in the running batch at once."""

    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + completion in tokens (default: the model's context length)."""

    max_num_batched_tokens: int | None = Field(None, ge=16)
    """Most tokens one engine step processes: every running decode, then prefill chunks (a longer prompt
    is prefilled over several steps). Default: 2048. Must be >= max_num_seqs."""

    long_prefill_token_threshold: int | None = Field(None, ge=1)
    """Most prompt tokens one sequence prefills in a step (None: up to max_num_batched_tokens). Lower
    keeps a long prompt from lengthening the running streams' inter-token latency, at some prefill cost."""

    max_prefill_stall: float | None = Field(2.0, gt=1.0)
    """While streams decode, the time a step that also prefills a long prompt is sized to take, as a
    multiple of a step of the decodes alone; each further long prompt waiting for its first token adds
    max_prefill_stall - 1 decode steps (two waiting at 2.0: three decode steps). A long prompt is one of
    more than 256 tokens whose whole prefill would take longer than 16 decode steps; it is prefilled in
    chunks sized to this, from step times measured as the engine runs (engine/prefill_pacer.py), so on
    any device the streams keep their pace while it prefills, and its first token comes later (a
    4000-token prompt beside 16 streams on 2-vCPU CPUs: 2.2x to 4.7x later than unpaced). Under a steady
    load of long prompts it costs throughput (a trace with 40% cold 1,000-token prompts: 21%; README).
    Shorter prompts, and any prompt while nothing decodes, take what the step's budget and
    long_prefill_token_threshold leave. None (`--max-prefill-stall null`): no pacing."""

    max_lora_bypass: int = Field(16, ge=0)
    """Most requests that arrived later may be admitted ahead of a waiting one (a count of requests, not
    steps). Waiting requests that add no adapter to what the device holds (the base model, an adapter already
    resident; on CPU, one already in the running batch) are admitted first: fewer loads, and fewer adapters for
    every decode step to read. A request overtaken this many times is admitted before anything behind it, as
    first come, first served would, so one whose adapter finds no room gets the next room that frees. 0:
    strict FCFS."""


class EngineConfig(ConfigBase):
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        quantization, lc = self.model.quantization, self.lora
        if quantization is not None and (lc.merge is not None or lc.merge_policy != "off"):
            field = "merge" if lc.merge is not None else "merge_policy"
            raise ValueError(
                f"{field} needs a full-precision base: with quantization={quantization} a merged adapter would not be "
                "served as it is unmerged (its delta would be quantized with the base); adapters are served unmerged"
            )
        return self


class ServerConfig(ConfigBase):
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for all interfaces)."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port."""

    served_model_name: str | None = None
    """Name of the base model in the API (default: the model directory's name)."""

    api_key: str | None = None
    """If set, every /v1 request needs `Authorization: Bearer <key>` (/health and /version stay open)."""

    admin_api_key: str | None = None
    """If set, adapter management endpoints need this key instead of api_key."""

    auth_file: Path | None = None
    """JSON or TOML file of API keys, each with a tenant and a role (admin or user): {"keys": [{"key",
    "tenant", "role"}]}. A tenant's uploads are seen and run only by that tenant and admins. Works beside
    api_key and admin_api_key."""

    metrics_api_key: str | None = None
    """Key for GET /metrics (a Prometheus scraper's), accepted beside the admin keys. Once any key is
    configured, /metrics needs this key or an admin key: it names every tenant's adapters and their use."""

    disable_metrics_auth: bool = False
    """Serve GET /metrics without a key even when keys are configured (as vLLM does), for a scraper that
    cannot send one. Only where the network already keeps the port private."""

    api_docs: Literal["auto", "on", "off"] = "auto"
    """Serve /docs, /redoc and /openapi.json. auto: only when no key is configured. The schema maps
    every management route, so a server with keys (a production one) does not hand it to anonymous
    callers unless asked; a keyless development server shows it as before."""

    max_adapters_per_tenant: int | None = Field(None, ge=0)
    """Most adapters one --auth-file tenant may store by uploading (admin keys are not limited). An upload
    past it is refused before it is stored: 403, code "quota_exceeded". None: no limit."""

    max_adapter_bytes_per_tenant: int | None = Field(None, ge=0)
    """Most bytes of adapter files (adapter_config.json + adapter_model.safetensors) one --auth-file tenant
    may store; an upload that would pass it is refused before it is stored: 403, code "quota_exceeded".
    Admin keys are not limited. None: no limit."""

    max_queue: int = Field(256, ge=0)
    """Most generation requests admitted but not yet in the running batch (one with several choices,
    n or a prompt list, counts once per choice). Once it is reached a request gets 429 (type
    "rate_limit_error") with a Retry-After header instead of waiting."""

    max_n: int = Field(16, ge=1)
    """Most choices (n) a chat or completions request may ask for per prompt; past it: 400, code
    "limit_exceeded" (vLLM sets none). Each choice is a sequence of its own in the engine."""

    max_prompts: int = Field(256, ge=1)
    """Most prompts in one /v1/completions request's prompt list; past it: 400, code "limit_exceeded".
    A request runs prompts x n sequences, and max_queue counts it as that many requests."""

    retry_after_s: int = Field(1, ge=1)
    """Seconds sent in the Retry-After header of a 429 for a full queue."""

    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest prompt accepted, in tokens (after the chat template). None: only max_model_len limits it."""

    max_tokens_limit: int | None = Field(None, ge=1)
    """Largest max_tokens (or max_completion_tokens) a request may ask for; also the completion
    length of a request that gives none. None: up to max_model_len."""

    max_stop_strings: int = Field(4, ge=0)
    """Most stop strings in one request (OpenAI allows 4)."""

    max_stop_chars: int = Field(256, ge=1)
    """Longest stop string, in characters."""

    max_stop_token_ids: int = Field(256, ge=0)
    """Most stop_token_ids in one request (a set, looked up once per generated token): enough for
    every special token of a Llama 3 vocabulary."""

    max_logit_bias: int = Field(1024, ge=0)
    """Most logit_bias entries in one request (each must be in the vocabulary). Each is added to the
    request's logits at every step."""

    max_prompt_chars_per_token: int = Field(32, ge=1)
    """A prompt is refused before it is tokenized (400, code "limit_exceeded") when its text has more
    characters than this times its token limit (max_prompt_tokens, else max_model_len), and a chat
    when it has more messages than that token limit. Text averages 3-5 characters per token."""

    max_top_logprobs: int = Field(20, ge=0, le=20)
    """Most alternatives per token a request may ask for (top_logprobs; logprobs on /v1/completions)."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest JSON request body, in bytes (413 past it). Adapter uploads are bounded by max_adapter_bytes instead."""

    request_timeout_s: float | None = Field(600.0, gt=0)
    """Seconds a generation request may take, queueing included. On expiry it is aborted: 504
    (code "request_timeout"), or for a stream already started an error event then [DONE]. None: no limit."""

    header_timeout_s: float | None = Field(20.0, gt=0)
    """Seconds a client may take to send a request line and headers, counted from the connection (or, on a
    kept-alive connection, from the request's first byte). Past it the connection is closed, with a 408 if
    part of a request came (slowloris defence). None: no limit."""

    body_timeout_s: float | None = Field(30.0, gt=0)
    """Seconds the server waits for the next piece of a request body (JSON or adapter upload). Past it:
    408, code "body_timeout", and the connection is closed. None: no limit."""

    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM/SIGINT: stop accepting, then let running requests finish for up to this many
    seconds before they are cancelled; the process then exits with code 0."""

    access_log: bool = True
    """Log one JSON line per request (method, path, status, duration, model, adapter, tokens) to
    the lora_serve.access logger. Never the API key or the prompt."""

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.disable_metrics_auth and self.metrics_api_key is not None:
            raise ValueError("metrics_api_key has no effect with disable_metrics_auth; give one or the other")
        return self

    @property
    def has_keys(self) -> bool:
        """Some key or key file is configured: /metrics and the API docs are closed by default."""
        keys = (self.api_key, self.admin_api_key, self.auth_file, self.metrics_api_key)
        return any(k is not None for k in keys)

    @property
    def serves_docs(self) -> bool:
        return self.api_docs == "on" or (self.api_docs == "auto" and not self.has_keys)


class RayConfig(ConfigBase):
    """`lora-serve serve-ray`: the replicas on Ray Serve. Each replica runs the engine and the server
    with the configs above; these settings say how many there are and what Ray gives each."""

    num_replicas: int = Field(2, ge=1)
    """Engine replicas, each a process (a Ray actor) holding the whole base model."""

    max_adapters_per_replica: int = Field(4, ge=1)
    """Adapters a replica keeps registered (Ray's per-replica LRU of multiplexed models). A request whose
    model names an adapter goes preferably to a replica holding it; past this many, a replica unregisters
    its least recently used one (its folder stays in adapter_dir, read again when next named there)."""

    num_cpus_per_replica: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each replica (torch's threads are --num-threads)."""

    num_gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each replica: 1 to serve on CUDA (Ray hides the GPUs from a replica that reserves none)."""
