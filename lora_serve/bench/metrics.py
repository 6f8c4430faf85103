"""Per-request timings of a streamed run and their aggregate, under `vllm bench serve`'s JSON keys.

    ttft  first streamed token - request sent
    tpot  (e2el - ttft) / (output_tokens - 1), per request (requests with one token have none)
    itl   every gap between consecutive streamed chunks, over all requests
    e2el  last byte - request sent
Percentiles are numpy's (linear interpolation); times in the JSON are ms.

Prefix caching: requests whose usage reports cached_tokens 0 are cold, those with more are warm;
their TTFTs are summarised apart (`*_ttft_cold_ms`, `*_ttft_warm_ms`), with the mean fraction of
prompt tokens found cached. A server that does not report cached_tokens gets none of these (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    index: int
    model: str
    input_len: int  # prompt tokens (the server's usage count when it sent one)
    output_len: int  # requested output tokens
    start_s: float = 0.0  # perf_counter when sent
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # the server's usage count
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (None: not reported)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000.0
    if ms.size == 0:
        return {f"{k}_{name}_ms": 0.0 for k in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES))}
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)), f"std_{name}_ms": float(ms.std())}
    out.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def is_good(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Meets every SLO (ms); a request without a TPOT (one token) passes the TPOT bound."""
    measured = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.e2el_s}
    return r.ok and all(measured[k] * 1000.0 <= bound for k, bound in slos_ms.items())


def aggregate(records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None) -> dict:
    """The run's summary: counts, throughputs (per second of `duration_s`), latency statistics, goodput."""
    done = [r for r in records if r.ok]
    total_in = sum(r.input_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    # None without SLOs, as vllm bench serve writes it.
    out["request_goodput"] = sum(is_good(r, slos_ms) for r in done) / duration_s if slos_ms else None
    out.update(_stats("ttft", [r.ttft_s for r in done]))
    out.update(_stats("tpot", [t for r in done if (t := r.tpot_s) is not None]))
    out.update(_stats("itl", [g for r in done for g in r.itl_s]))
    out.update(_stats("e2el", [r.e2el_s for r in done]))
    out.update(_cold_and_warm(done))
    out["errors"] = sorted({r.error for r in records if r.error})[:10]
    return out


def _cold_and_warm(done: list[RequestRecord]) -> dict[str, Any]:
    """TTFT of the requests that found nothing cached and of those that found some, and the mean cached fraction."""
    reported = [r for r in done if r.cached_tokens is not None]
    cold = [r.ttft_s for r in reported if r.cached_tokens == 0]
    warm = [r.ttft_s for r in reported if r.cached_tokens]
    out: dict[str, Any] = {"num_cold": len(cold), "num_warm": len(warm)}
    out["mean_cached_fraction"] = float(np.mean([(r.cached_tokens or 0) / max(r.input_len, 1) for r in reported])) if reported else None
    for name, values in (("ttft_cold", cold), ("ttft_warm", warm)):
        out.update({k: (v if values else None) for k, v in _stats(name, values).items()})
    return out
