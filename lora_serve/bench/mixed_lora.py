"""Adapters vs the bare base, lora-serve vs HF PEFT, measured side by side in one run.

    lora-serve bench lora --num-seqs 32 --num-adapters 32 --rank 16

Configurations, on the same N prompts of equal length (random adapters of rank r on all
seven projections): base; one adapter for every sequence, unmerged; the same adapter
merged into the base; N sequences over `num_adapters` distinct adapters. Prefill = the
step that prefills every prompt (median over repeats); decode = the median of the
following full-batch steps. The configurations alternate `repeats` times. PEFT runs the same prompts through
`generate` (single adapter, and `adapter_names=...` for the mixed batch) on one padded batch.
Beside each decode ratio: the ceiling the bytes its adapters add allow on this machine (roofline.py).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ..config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from ..config_fields import Dtype
from ..engine.llm_engine import LLMEngine
from ..lora.composition import Composition
from .random_adapters import ALL_LINEAR, write_random_adapter
from .roofline import decode_ceiling, read_bandwidth
from .runners import engine_phases, hf_phases, random_prompts
from .table import markdown_table


def run(
    model_path: Path,
    num_seqs: int = 32,
    num_adapters: int = 32,
    rank: int = 16,
    prompt_len: int = 64,
    decode_steps: int = 16,
    repeats: int = 3,
    with_peft: bool = True,
    seed: int = 0,
    max_lora_rank: int | None = None,
    lora_dtype: Dtype = "auto",
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(
            model_path, Path(tmp), num_adapters, rank, num_seqs, prompt_len + decode_steps + 8,
            max_lora_rank=max_lora_rank, lora_dtype=lora_dtype,
        )  # fmt: skip
        names = [f"bench-{i}" for i in range(num_adapters)]
        loras = [names[i % num_adapters] for i in range(num_seqs)]
        prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * num_seqs, seed)
        one = [names[0]] * num_seqs
        # label -> (adapter per sequence, adapter merged into the base during the run)
        configs: Configs = {
            "base": ([None] * num_seqs, None),
            "1 adapter unmerged": (one, None),
            "1 adapter merged": (one, names[0]),
            f"{num_adapters} adapters": (loras, None),
        }
        bandwidth = read_bandwidth()
        rounds = interleave(
            engine, configs, repeats, lambda loras, warm_up: engine_phases(engine, prompts, 2 if warm_up else decode_steps, loras)
        )
        result = summarise(rounds, "base")
        base_step_s = num_seqs / result["base"]["decode_tok_s"]
        for label, (seq_loras, merged) in configs.items():  # a merged adapter's rows run the bare base
            k = len({name for name in seq_loras if name is not None and name != merged})
            result[label]["decode_ceiling"] = decode_ceiling(base_step_s, k, engine.lora.adapter_bytes(names[0]), bandwidth)
        result["base"].update(read_bandwidth=bandwidth, adapter_bytes=engine.lora.adapter_bytes(names[0]))
        if with_peft:
            result.update(peft_rounds(model_path, Path(tmp), names, loras, prompts, decode_steps, repeats))
    return result


# label -> (adapter per sequence, adapter merged into the base while that configuration runs)
Configs = dict[str, tuple[Sequence[str | Composition | None], str | None]]


class MergingEngine(Protocol):
    """What interleave needs of an engine: LLMEngine, or random_engine.RandomEngine."""

    def merge_adapter(self, name: str) -> None: ...

    def unmerge_adapter(self) -> None: ...


def interleave(
    engine: MergingEngine, configs: Configs, repeats: int,
    measure: Callable[[Sequence[str | Composition | None], bool], object], on_round: Callable[[], object] = lambda: None,
) -> list[dict]:  # fmt: skip
    """[{label: measure(loras, warm_up)}] for `repeats` rounds, every configuration in turn within a round,
    after one warm-up round that is dropped (it also fills the slots). configs: label -> (adapter per
    sequence, adapter merged into the base while that configuration runs)."""
    rounds = []
    for rep in range(repeats + 1):
        one_round = {}
        for label, (loras, merged) in configs.items():
            if merged:
                engine.merge_adapter(merged)
            one_round[label] = measure(loras, rep == 0)
            engine.unmerge_adapter()
        if rep:
            rounds.append(one_round)
        on_round()
    return rounds


def build_engine(
    model_path: Path, tmp: Path, num_adapters: int, rank: int, num_seqs: int, max_len: int,
    max_loras: int | None = None, targets: tuple[str, ...] = ALL_LINEAR, kv_cache_gb: float = 1.0,
    max_lora_rank: int | None = None, lora_dtype: Dtype = "auto",
) -> LLMEngine:  # fmt: skip
    """An engine whose batch of num_seqs prompts fits one step, with adapters bench-0.. written to tmp and registered
    (max_loras default: no cap, as the server's)."""
    engine = LLMEngine.from_config(
        EngineConfig(
            scheduler=SchedulerConfig(
                max_num_seqs=max(num_seqs, 1), max_model_len=max(max_len, 64), max_num_batched_tokens=max(2048, num_seqs * max_len)
            ),
            cache=CacheConfig(kv_cache_memory_gb=kv_cache_gb, enable_prefix_caching=False),  # rounds repeat the prompts: prefill runs cold
            lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank or rank, lora_dtype=lora_dtype),
        ),
        model_path,
    )
    for i in range(num_adapters):
        path = write_random_adapter(tmp / f"bench-{i}", engine.arch, rank, seed=i, targets=targets)
        engine.adapters.register(f"bench-{i}", path, "lora-modules")
    return engine


def summarise(rounds: list[dict], base: str) -> dict:
    """Per configuration: median prefill and decode tok/s, and the ratios to `base` computed within
    each round (paired, so a slow spell of a shared machine hits both sides), median and range."""

    def rates(p, steps) -> tuple[float, float]:
        return p.tok_per_s, statistics.median(s.tok_per_s for s in steps)

    out = {}
    for k in rounds[0]:
        per_round = [(rates(*r[k]), rates(*r[base])) for r in rounds]
        prefill_ratios = [a[0] / b[0] for a, b in per_round]
        decode_ratios = [a[1] / b[1] for a, b in per_round]
        out[k] = {
            "prefill_tok_s": statistics.median(a[0] for a, _ in per_round),
            "decode_tok_s": statistics.median(a[1] for a, _ in per_round),
            "prefill_ratio": statistics.median(prefill_ratios),
            "decode_ratio": statistics.median(decode_ratios),
            "decode_ratio_range": (min(decode_ratios), max(decode_ratios)),
        }
    return out


def peft_rounds(model_path: Path, tmp: Path, names: list[str], loras: list[str], prompts, decode_steps: int, repeats: int) -> dict:
    """PEFT base / one adapter / the mixed batch (adapter_names) on one padded batch, summarised like ours."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    model = PeftModel.from_pretrained(hf, tmp / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp / name, adapter_name=name)
    model.set_adapter(names[0])
    rounds = []
    for _ in range(repeats):
        with model.disable_adapter():  # PEFT's own switch back to the plain base model
            base = hf_phases(model, prompts, decode_steps, pad)
        rounds.append({
            "peft base": base,
            "peft 1 adapter unmerged": hf_phases(model, prompts, decode_steps, pad),
            f"peft {len(names)} adapters": hf_phases(model, prompts, decode_steps, pad, adapter_names=loras),
        })  # fmt: skip
    return summarise(rounds, "peft base")


def report(result: dict, num_adapters: int) -> str:
    mixed = f"{num_adapters} adapters"
    rows = []
    for name, r in result.items():
        lo, hi = r["decode_ratio_range"]
        ceiling = r.get("decode_ceiling")
        rows.append(
            [
                name if name.startswith("peft") else f"lora-serve {name}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['prefill_ratio']:.2f}",
                f"{r['decode_tok_s']:.1f}",
                f"{r['decode_ratio']:.2f} ({lo:.2f}-{hi:.2f})",
                "" if ceiling is None else f"{ceiling:.2f}",
                "" if ceiling is None else f"{r['decode_ratio'] / ceiling:.2f}",
            ]
        )
    header = [
        "configuration",
        "prefill tok/s",
        "vs its base",
        "decode tok/s",
        "vs its base (range over rounds)",
        "decode ceiling",
        "of the ceiling",
    ]
    text = markdown_table(header, rows)
    base = result["base"]
    if "read_bandwidth" in base:  # run() measured it (gpu_check prints its own memory-bound ceiling)
        text += (
            f"\n\ndecode ceiling = base step / (base step + distinct adapters x {base['adapter_bytes'] / 1e6:.1f} MB per "
            f"adapter / {base['read_bandwidth'] / 1e9:.1f} GB/s read bandwidth measured here); see bench/roofline.py"
        )
    peft_mixed = result.get(f"peft {mixed}")
    if peft_mixed:
        text += (
            f"\n\nlora-serve mixed / PEFT mixed: prefill {result[mixed]['prefill_tok_s'] / peft_mixed['prefill_tok_s']:.2f}x, "
            f"decode {result[mixed]['decode_tok_s'] / peft_mixed['decode_tok_s']:.2f}x"
        )
    return text
