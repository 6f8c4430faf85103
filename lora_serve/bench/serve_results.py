"""`bench serve` results: the terminal table, the JSON files and the plots in --result-dir."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import plots
from .table import markdown_table


def report(results: list[dict]) -> str:
    header = [
        "run",
        "done/sent",
        "req/s",
        "out tok/s",
        "total tok/s",
        "TTFT ms med/p90/p99",
        "TPOT ms med/p90/p99",
        "ITL ms med/p99",
        "goodput req/s",
    ]
    rows = []
    for r in results:
        good = r["request_goodput"]
        rows.append([
            plots.run_name(r), f"{r['completed']}/{r['num_prompts']}", f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}", f"{r['total_token_throughput']:.1f}",
            "/".join(f"{r[f'{s}_ttft_ms']:.0f}" for s in ("median", "p90", "p99")),
            "/".join(f"{r[f'{s}_tpot_ms']:.1f}" for s in ("median", "p90", "p99")),
            f"{r['median_itl_ms']:.1f}/{r['p99_itl_ms']:.1f}", "-" if good is None else f"{good:.2f}",
        ])  # fmt: skip
    text = markdown_table(header, rows)
    if any(r.get("shared_prefix_len") for r in results):
        text += "\n\n" + cold_and_warm(results)
    for ratio in base_ratios(results):
        lo, hi = ratio["total_token_throughput_range"]
        text += (f"\n\nrate={ratio['request_rate']:g}: adapters / base, same trace, median of {ratio['rounds']} paired rounds: "
                 f"total tok/s {ratio['total_token_throughput']:.3f}x ({lo:.3f}-{hi:.3f}), "
                 f"median TPOT {ratio['median_tpot_ms']:.3f}x, median TTFT {ratio['median_ttft_ms']:.3f}x, "
                 f"goodput at {SLO_FACTOR:g}x the base's median TTFT and TPOT {ratio['goodput_vs_base']:.3f}x "
                 f"({ratio['goodput_vs_base_range'][0]:.3f}-{ratio['goodput_vs_base_range'][1]:.3f})")  # fmt: skip
    errors = sorted({e for r in results for e in r["errors"]})
    if errors:
        text += "\n\nerrors: " + "; ".join(errors[:5])
    return text


def cold_and_warm(results: list[dict]) -> str:
    """--shared-prefix-len runs: TTFT of the requests that found no prompt token cached and of those that did."""

    def ms(r: dict, kind: str) -> str:
        return "-" if r[f"median_ttft_{kind}_ms"] is None else f"{r[f'median_ttft_{kind}_ms']:.0f}/{r[f'p99_ttft_{kind}_ms']:.0f}"

    header = ["run", "cold reqs", "cold TTFT ms med/p99", "warm reqs", "warm TTFT ms med/p99", "mean cached fraction"]
    rows = [
        [plots.run_name(r), str(r["num_cold"]), ms(r, "cold"), str(r["num_warm"]), ms(r, "warm"),
         "-" if r["mean_cached_fraction"] is None else f"{r['mean_cached_fraction']:.3f}"]
        for r in results
    ]  # fmt: skip
    return markdown_table(header, rows)


SLO_FACTOR = 2.0  # goodput_vs_base's SLO: TTFT and TPOT each at most this many times the base's median


def base_ratios(results: list[dict]) -> list[dict]:
    """Per rate: adapters run / base run of the same trace, paired within each round; median and range over rounds.
    goodput_vs_base: requests per second meeting an SLO of SLO_FACTOR x the base's median TTFT and TPOT in
    that round, the adapters' over the base's own (the bound follows the machine, so rounds compare)."""
    keys = ("total_token_throughput", "output_throughput", "median_tpot_ms", "median_ttft_ms", "goodput_vs_base")
    out = []
    for rate in dict.fromkeys(r["request_rate"] for r in results):
        pairs = [
            (a, b)
            for a in results if a["target"] == "adapters" and a["request_rate"] == rate
            for b in results if b["target"] == "base" and b["request_rate"] == rate and b["round"] == a["round"]
        ]  # fmt: skip
        if pairs:
            pairs = [
                ({**a, "goodput_vs_base": _goodput_at_base_slo(a, b)}, {**b, "goodput_vs_base": _goodput_at_base_slo(b, b)})
                for a, b in pairs
            ]
            per_key = {k: [a[k] / b[k] if b[k] else math.nan for a, b in pairs] for k in keys}
            out.append({"request_rate": rate, "rounds": len(pairs), **{k: statistics.median(v) for k, v in per_key.items()},
                        **{f"{k}_range": (min(v), max(v)) for k, v in per_key.items()}})  # fmt: skip
    return out


def _goodput_at_base_slo(run: dict, base: dict) -> float:
    """Requests per second of `run` whose TTFT and TPOT are at most SLO_FACTOR x `base`'s medians."""

    def tpot(x: dict) -> float:  # one-token replies have none: they pass the TPOT bound, as in metrics.is_good
        return (x["e2el_s"] - x["ttft_s"]) / (x["output_tokens"] - 1) if x["output_tokens"] > 1 else 0.0

    done = [x for x in base["records"] if x["error"] is None]
    if not done or not run["duration"]:
        return math.nan
    ttft_bound = SLO_FACTOR * statistics.median(x["ttft_s"] for x in done)
    tpot_bound = SLO_FACTOR * statistics.median(tpot(x) for x in done)
    good = [x for x in run["records"] if x["error"] is None and x["ttft_s"] <= ttft_bound and tpot(x) <= tpot_bound]
    return len(good) / run["duration"]


def write(results: list[dict], result_dir: Path, label: str) -> list[Path]:
    """One JSON per run (vllm bench serve's keys plus per-request records), a summary, and the plots."""
    result_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        rate = "inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}"
        path = result_dir / f"{label}-{r['target']}-rate{rate}-round{r['round']}.json"
        path.write_text(json.dumps({**r, "request_rate": rate}, indent=1))  # "inf" as vllm writes it
        paths.append(path)
    summary = {"runs": [{k: v for k, v in r.items() if k != "records"} for r in results], "base_ratios": base_ratios(results)}
    (result_dir / f"{label}-summary.json").write_text(json.dumps(summary, indent=1))  # rate inf: Infinity
    paths.append(plots.latency_cdfs(results, result_dir / f"{label}-latency-cdf.png"))
    if len({r["request_rate"] for r in results}) > 1:
        paths.append(plots.latency_vs_rate(results, result_dir / f"{label}-latency-vs-rate.png"))
    return paths
