"""PNG plots beside the JSON results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import RequestRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(results: list[dict], path: Path) -> Path:
    """One panel per metric (TTFT, TPOT, E2E), one CDF line per run (label, target, rate)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, [("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency")]):
        for r in results:
            values = _per_request_ms(r, key)
            if values.size:
                ax.plot(np.sort(values), np.arange(1, values.size + 1) / values.size, label=run_name(r))
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def latency_vs_rate(results: list[dict], path: Path) -> Path:
    """Median and p99 TTFT and TPOT against the request rate, one line per target."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("ttft", "tpot")):
        for color, target in zip(("tab:blue", "tab:orange"), sorted({r["target"] for r in results})):
            runs = sorted((r for r in results if r["target"] == target and not r.get("round")), key=lambda r: r["request_rate"])
            rates = [r["request_rate"] for r in runs]
            for stat, style in (("median", "-o"), ("p99", "--s")):
                ax.plot(rates, [r[f"{stat}_{key}_ms"] for r in runs], style, color=color, label=f"{target} {stat}")
        ax.set(title=key.upper(), xlabel="request rate (req/s)", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def ratio_vs_adapters(rows: list[dict], path: Path) -> Path:
    """Offline sweep: prefill, decode and whole-run throughput as a ratio to the base, against distinct adapters."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, phase in zip(axes, ("prefill", "decode", "run")):
        for config in sorted({r["config"] for r in rows if not r["config"].endswith("base")}):
            pts = sorted((r["num_adapters"], r[f"{phase}_ratio"]) for r in rows if r["config"] == config and f"{phase}_ratio" in r)
            if pts:
                ax.plot(*zip(*pts), "-o", label=config)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"{phase} tok/s / base (same rounds)", xlabel="distinct adapters", ylabel="ratio", xscale="log", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def run_name(r: dict) -> str:
    rate = "inf" if r["request_rate"] == float("inf") else f"{r['request_rate']:g}/s"
    name = f"{r['target']} rate={rate}" + (f" c={r['max_concurrency']}" if r.get("max_concurrency") else "")
    return name + (f" #{r['round']}" if r.get("round") else "")


def _per_request_ms(r: dict, key: str) -> np.ndarray:
    recs = [RequestRecord(**x) for x in r["records"] if x["error"] is None]
    vals = [getattr(x, f"{key}_s") for x in recs]
    return np.asarray([v for v in vals if v is not None]) * 1000.0


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
