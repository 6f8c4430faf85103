"""The engine's cost of adapters as the number of distinct adapters grows, measured side by side.

    lora-serve bench engine --num-adapters-list 1 8 32 128 --num-seqs 128 --rank 16

For each N in the list: a fresh engine with N random adapters (the server's default adapter memory:
all of them resident at once; --max-loras caps that), the same num_seqs prompts run as: base; one
adapter merged into the base; sequences spread round-robin over N adapters, unmerged. The three
alternate `repeats` times after a warm-up round. With N > max_loras the scheduler rotates adapters,
so some prefill and decode steps run part of the batch only; the whole-run throughput shows that
cost. Every ratio is to the base of the same round. PEFT (optional) runs the same prompts as one
padded batch with adapter_names. Beside each decode ratio, the ceiling that reading the bytes of
min(N, max_loras) adapters allows here (roofline.py).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .mixed_lora import Configs, build_engine, interleave, peft_rounds, summarise
from .random_adapters import ALL_LINEAR
from .roofline import decode_ceiling, read_bandwidth
from .runners import engine_run_phases, random_prompts
from .table import markdown_table

MERGED = "1 adapter merged"
UNMERGED = "N adapters unmerged"  # N: the row's num_adapters


def sweep(
    model_path: Path,
    num_adapters_list: list[int],
    num_seqs: int = 64,
    rank: int = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    max_loras: int | None = None,
    prompt_len: int = 32,
    decode_steps: int = 16,
    repeats: int = 3,
    with_peft: bool = False,
    seed: int = 0,
    progress: bool = True,
    kv_cache_gb: float = 1.0,
) -> list[dict]:
    """One row per (N, configuration): median prefill / decode / whole-run tok/s and ratios to base."""
    from tqdm import tqdm

    rows: list[dict] = []
    bandwidth = read_bandwidth()
    bar = tqdm(total=len(num_adapters_list) * (repeats + 1), desc="bench engine", unit="round", disable=not progress)
    for n in num_adapters_list:
        slots = min(n, max_loras or n)  # the most distinct adapters one step can hold
        with tempfile.TemporaryDirectory() as tmp:
            engine = build_engine(model_path, Path(tmp), n, rank, num_seqs, prompt_len + decode_steps + 8, max_loras, targets, kv_cache_gb)
            names = [f"bench-{i}" for i in range(n)]
            prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * num_seqs, seed)
            spread = [names[i % n] for i in range(num_seqs)]
            configs: Configs = {"base": ([None] * num_seqs, None), MERGED: ([names[0]] * num_seqs, names[0]), UNMERGED: (spread, None)}
            rounds = interleave(
                engine,
                configs,
                repeats,
                lambda loras, warm_up: engine_run_phases(engine, prompts, 2 if warm_up else decode_steps, loras),  # noqa: B023 (run in this iteration)
                bar.update,
            )
            new = {row["config"]: row for row in _rows(n, slots, rounds)}
            base_step_s = num_seqs / new["base"]["decode_tok_s"]
            for label, row in new.items():  # a full decode step holds min(N, slots) distinct adapters
                k = min(n, slots, num_seqs) if label == UNMERGED else 0
                row["decode_ceiling"] = decode_ceiling(base_step_s, k, engine.lora.adapter_bytes(names[0]), bandwidth)
            rows += new.values()
            if with_peft:
                peft = peft_rounds(model_path, Path(tmp), names, spread, prompts, decode_steps, repeats)
                peft[f"peft {UNMERGED}"] = peft.pop(f"peft {n} adapters")
                rows += [{"num_adapters": n, "max_loras": n, "config": k, **v} for k, v in peft.items()]
    bar.close()
    return rows


def write(rows: list[dict], result_dir: Path, label: str) -> list[Path]:
    import json

    from . import plots

    result_dir.mkdir(parents=True, exist_ok=True)
    path = result_dir / f"{label}.json"
    path.write_text(json.dumps(rows, indent=1))
    return [path, plots.ratio_vs_adapters(rows, result_dir / f"{label}-ratio-vs-adapters.png")]


def _rows(n: int, slots: int, rounds: list[dict]) -> list[dict]:
    # rounds: [{config: (prefill, decode steps, whole run)}]
    phases = summarise([{k: v[:2] for k, v in r.items()} for r in rounds], "base")
    rows = []
    for label in rounds[0]:
        whole = [r[label][2].tok_per_s / r["base"][2].tok_per_s for r in rounds]
        rows.append({
            "num_adapters": n, "max_loras": slots, "config": label, **phases[label],
            "run_tok_s": statistics.median(r[label][2].tok_per_s for r in rounds),
            "run_ratio": statistics.median(whole),
        })  # fmt: skip
    return rows


def report(rows: list[dict]) -> str:
    table = [
        [
            str(r["num_adapters"]), str(r["max_loras"]), r["config"] if r["config"].startswith("peft") else f"lora-serve {r['config']}",
            f"{r['prefill_tok_s']:.0f}", f"{r['prefill_ratio']:.2f}",
            f"{r['decode_tok_s']:.1f}", f"{r['decode_ratio']:.2f}",
            f"{r['decode_ceiling']:.2f}" if "decode_ceiling" in r else "-",
            f"{r['decode_ratio'] / r['decode_ceiling']:.2f}" if "decode_ceiling" in r else "-",
            f"{r['run_tok_s']:.1f}" if "run_tok_s" in r else "-", f"{r['run_ratio']:.2f}" if "run_ratio" in r else "-",
        ]
        for r in rows
    ]  # fmt: skip
    header = [
        "adapters",
        "resident at most",
        "configuration",
        "prefill tok/s",
        "/ base",
        "decode tok/s",
        "/ base",
        "decode ceiling",
        "of the ceiling",
        "whole run out tok/s",
        "/ base",
    ]
    return markdown_table(header, table)
