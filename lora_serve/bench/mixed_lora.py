"""Adapters vs the bare base, lora-serve vs HF PEFT, measured side by side in one run.

    lora-serve bench lora --num-seqs 32 --num-adapters 32 --rank 16

Configurations, on the same N prompts of equal length (random adapters of rank r on all
seven projections): base; one adapter for every sequence, unmerged; the same adapter
merged into the base; N sequences over `num_adapters` distinct adapters. Prefill = the
step that prefills every prompt (median over repeats); decode = the median of the
following full-batch steps. The configurations alternate `repeats` times. PEFT runs the same prompts through
`generate` (single adapter, and `adapter_names=...` for the mixed batch) on one padded batch.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from ..config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from ..engine.llm_engine import LLMEngine
from .random_adapters import write_random_adapter
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
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(model_path, Path(tmp), num_adapters, rank, num_seqs, prompt_len + decode_steps + 8)
        names = [f"bench-{i}" for i in range(num_adapters)]
        loras = [names[i % num_adapters] for i in range(num_seqs)]
        prompts = random_prompts(engine.arch.vocab_size, [prompt_len] * num_seqs, seed)
        one = [names[0]] * num_seqs
        # label -> (adapter per sequence, adapter merged into the base during the run)
        configs = {
            "base": ([None] * num_seqs, None),
            "1 adapter unmerged": (one, None),
            "1 adapter merged": (one, names[0]),
            f"{num_adapters} adapters": (loras, None),
        }
        samples: dict[str, list] = {k: [] for k in configs}
        for rep in range(repeats + 1):  # the first round warms up (and fills every slot)
            for k, (v, merged) in configs.items():
                if merged:
                    engine.merge_adapter(merged)
                timing = engine_phases(engine, prompts, decode_steps if rep else 2, v)
                engine.unmerge_adapter()
                if rep:
                    samples[k].append(timing)
        result = {k: _median(v) for k, v in samples.items()}
        if with_peft:
            result.update(_peft(model_path, Path(tmp), names, loras, prompts, decode_steps))
    return result


def _engine(model_path: Path, tmp: Path, num_adapters: int, rank: int, num_seqs: int, max_len: int) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=max(num_seqs, 1), max_model_len=max(max_len, 64), max_num_batched_tokens=max(2048, num_seqs * max_len)),
            cache=CacheConfig(kv_cache_memory_gb=1.0),
            lora=LoRAConfig(max_loras=num_adapters, max_lora_rank=rank),
        ),
        model_path,
    )
    for i in range(num_adapters):
        path = write_random_adapter(tmp / f"bench-{i}", engine.arch, rank, seed=i)
        engine.lora.register(f"bench-{i}", path, "lora-modules")
    return engine


def _median(samples: list) -> dict:
    return {
        "prefill_tok_s": statistics.median(p.tok_per_s for p, _ in samples),
        "decode_tok_s": statistics.median(d.tok_per_s for _, steps in samples for d in steps),
    }


def _peft(model_path: Path, tmp: Path, names: list[str], loras: list[str], prompts, decode_steps: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    base = hf_phases(hf, prompts, decode_steps, pad)
    model = PeftModel.from_pretrained(hf, tmp / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp / name, adapter_name=name)
    mixed = hf_phases(model, prompts, decode_steps, pad, adapter_names=loras)
    model.set_adapter(names[0])
    single = hf_phases(model, prompts, decode_steps, pad)
    return {
        "peft base": {"prefill_tok_s": base[0].tok_per_s, "decode_tok_s": base[1].tok_per_s},
        "peft 1 adapter unmerged": {"prefill_tok_s": single[0].tok_per_s, "decode_tok_s": single[1].tok_per_s},
        f"peft {len(names)} adapters": {"prefill_tok_s": mixed[0].tok_per_s, "decode_tok_s": mixed[1].tok_per_s},
    }


def report(result: dict, num_adapters: int) -> str:
    mixed = f"{num_adapters} adapters"
    base = result["base"]
    rows = []
    for name, r in result.items():
        ref = result["peft base"] if name.startswith("peft") else base
        rows.append([
            name if name.startswith("peft") else f"lora-serve {name}",
            f"{r['prefill_tok_s']:.0f}", f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}",
            f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}",
        ])
    text = markdown_table(["configuration", "prefill tok/s", "vs its base", "decode tok/s", "vs its base"], rows)
    peft_mixed = result.get(f"peft {mixed}")
    if peft_mixed:
        text += (
            f"\n\nlora-serve mixed / PEFT mixed: prefill {result[mixed]['prefill_tok_s'] / peft_mixed['prefill_tok_s']:.2f}x, "
            f"decode {result[mixed]['decode_tok_s'] / peft_mixed['decode_tok_s']:.2f}x"
        )
    return text
