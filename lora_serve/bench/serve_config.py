"""What `lora-serve bench serve` sends: the workload (S-LoRA's generator) and the client settings.

Light on purpose (pydantic only): the CLI builds it before any heavy import. The trace
itself is drawn in workload.py; the metrics are computed in metrics.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import CliVariadicArg, NoDecode  # markers only: `--adapters a b c` on the command line


def _rates(value: Any) -> Any:
    """`--request-rate 1 2 inf`: the CLI hands over a JSON list, and JSON has no `inf`; split it by hand."""
    return value.strip("[] ").replace(",", " ").split() if isinstance(value, str) else value


class WorkloadConfig(BaseModel):
    """A seeded request trace: which adapter, when, how long in and out (S-LoRA, Sheng et al. 2023, section 7)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    adapters: CliVariadicArg[list[str]] = Field(default_factory=list)
    """Adapter names to spread requests over (their order is their popularity rank: the first is the most popular)."""

    adapter_prefix: str | None = None
    """Alternative to --adapters: names <prefix>0 .. <prefix>{num_adapters-1}."""

    num_adapters: int | None = Field(None, ge=1)
    """With --adapter-prefix: how many adapters."""

    popularity: Literal["uniform", "power-law", "zipf"] = "power-law"
    """Adapter popularity. power-law: S-LoRA's int(power(alpha) * n); zipf: P(rank k) ~ 1 / k^s."""

    alpha: float = Field(1.0, gt=0, le=1)
    """power-law exponent: 1 is uniform, smaller is more skewed (S-LoRA uses 0.1 .. 1)."""

    zipf_s: float = Field(1.1, gt=0)
    """zipf exponent s."""

    request_rate: CliVariadicArg[Annotated[list[float], NoDecode, BeforeValidator(_rates)]] = Field([math.inf])
    """Requests per second (one run per value; inf: all at once). Several values give the latency-vs-rate plot."""

    cv: float = Field(1.0, gt=0)
    """Coefficient of variation of the Gamma inter-arrival times (1: Poisson; >1 burstier)."""

    concurrency: int | None = Field(None, ge=1)
    """At most this many requests in flight (with rate inf: a closed loop of this many clients)."""

    input_len: CliVariadicArg[list[int]] = Field([128])
    """Prompt tokens: one value (fixed) or two (uniform in [lo, hi])."""

    output_len: CliVariadicArg[list[int]] = Field([64])
    """Output tokens, exact (EOS ignored): one value or two (uniform in [lo, hi])."""

    shared_prefix_len: int = Field(0, ge=0)
    """Tokens (words with --prompt-format text) of a system prompt that every request of an adapter (or of
    the base) starts with before its own --input-len: one per adapter, seeded, distinct across adapters.
    The report then splits TTFT into cold requests (no prompt token cached) and warm ones."""

    prompt_format: Literal["token-ids", "text"] = "token-ids"
    """token-ids: random ids sent as a list of ints (exact lengths); text: random words (lengths approximate)."""

    num_requests: int = Field(200, ge=1)
    """Requests in the trace (with --duration: an upper bound)."""

    duration: float | None = Field(None, gt=0)
    """Stop issuing requests after this many seconds (open loop: arrivals beyond it are dropped)."""

    seed: int = 0
    """The same seed gives the identical trace (adapters, arrivals, lengths, prompts)."""

    @model_validator(mode="after")
    def _check_workload(self) -> WorkloadConfig:
        if self.adapters and self.adapter_prefix:
            raise ValueError("give --adapters or --adapter-prefix, not both")
        if self.adapter_prefix is not None and self.num_adapters is None:
            raise ValueError("--adapter-prefix needs --num-adapters")
        for name in ("input_len", "output_len"):
            v = getattr(self, name)
            if len(v) not in (1, 2) or min(v) < 1 or v[0] > v[-1]:
                raise ValueError(f"--{name.replace('_', '-')} takes one length, or two (lo hi) with 1 <= lo <= hi")
        if any(not r > 0 for r in self.request_rate):
            raise ValueError("--request-rate values must be > 0 (inf: all at once)")
        return self

    def adapter_names(self) -> list[str]:
        if self.adapter_prefix is not None:
            return [f"{self.adapter_prefix}{i}" for i in range(self.num_adapters or 0)]
        return list(self.adapters)


class ClientConfig(BaseModel):
    """Where and how the requests are sent, and what is written."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    url: str = "http://127.0.0.1:8000"
    """The server's base URL (without /v1)."""

    api_key: str | None = None
    """Bearer token, if the server wants one."""

    base_model: str | None = None
    """The base model's id (default: the first id GET /v1/models lists)."""

    base_only: bool = False
    """Send the trace to the base model only (every request names the base)."""

    with_base: bool = False
    """Run the trace twice per rate, adapters then base, and report the paired throughput ratio."""

    rounds: int = Field(1, ge=1)
    """With --with-base: alternate adapters and base this many times per rate; ratios are medians over the pairs.
    Each round sends the same adapters, arrivals and lengths with prompts of its own, so none is served
    from the prefix cache an earlier round filled (--shared-prefix-len system prompts stay the same)."""

    warmup_requests: int = Field(4, ge=0)
    """Requests sent to the base before measuring (not recorded): the first forward passes are slow.
    Their prompts are none of the measured rounds'."""

    vocab_size: int = Field(32000, ge=1001)
    """Random prompt ids are drawn from [1000, vocab_size) (32000 is inside every common tokenizer)."""

    goodput: CliVariadicArg[list[str]] = Field(default_factory=list)
    """SLOs in ms, e.g. ttft:500 tpot:100 (keys: ttft, tpot, e2el). A request is good if it meets all."""

    result_dir: Path | None = None
    """Folder for the JSON results and PNG plots (default: print only)."""

    label: str = "lora"
    """Name of this run in file names and plots."""

    timeout_s: float = Field(600.0, gt=0)
    """Per-request timeout."""

    progress: bool = True
    """Show a tqdm progress bar."""

    llama_cpp_loras: CliVariadicArg[list[str]] = Field(default_factory=list)
    """For a comparison with llama.cpp's llama-server: the adapter names in the order of its --lora-scaled
    files (loaded at scale 0). A request for adapter i then names the base model and sends llama.cpp's
    `"lora": [{"id": i, "scale": 1}]` (docs/benchmarks.md gives the recipe)."""

    def extra_body(self, adapter: str | None) -> dict:
        """Request fields beside the OpenAI ones for a request to `adapter` (None: the base)."""
        if not self.llama_cpp_loras or adapter is None:
            return {}
        if adapter not in self.llama_cpp_loras:
            raise ValueError(f"adapter {adapter!r} is not in --llama-cpp-loras {self.llama_cpp_loras}")
        return {"lora": [{"id": self.llama_cpp_loras.index(adapter), "scale": 1.0}]}

    @model_validator(mode="after")
    def _check_client(self) -> ClientConfig:
        self.slos()  # raises on a malformed entry
        if self.base_only and self.with_base:
            raise ValueError("--base-only and --with-base exclude each other")
        return self

    def slos(self) -> dict[str, float]:
        """{'ttft': ms, ...} from the --goodput entries."""
        out = {}
        for entry in self.goodput:
            key, sep, value = entry.partition(":")
            if not sep or key not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"--goodput entry {entry!r} must look like ttft:500, tpot:100 or e2el:2000 (ms)")
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"--goodput entry {entry!r}: {value!r} is not a number of ms") from None
        return out
