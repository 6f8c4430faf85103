"""Random PEFT adapters on the embedded base, saved with `save_pretrained`: the independent reference.

One PeftModel carries every adapter (PEFT's own LoRA layers); `set_adapter(name)` selects
the reference for one adapter, `disable_adapter()` gives the base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig kwargs; covers ranks 4..64, attention-only, MLP-only, all-linear, rslora, patterns.
ADAPTER_CONFIGS: dict[str, dict] = {
    "r4-attn": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "r8-mlp": dict(r=8, lora_alpha=16, target_modules=MLP),
    "r16-all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "r64-qv": dict(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=8, target_modules=ATTN + MLP, use_rslora=True),
    "r8-pattern": dict(
        r=8,
        lora_alpha=16,
        target_modules=ATTN + ["down_proj"],
        rank_pattern={"k_proj": 4, "model.layers.1.self_attn.o_proj": 2},
        alpha_pattern={"down_proj": 32},
    ),
}


def make_peft_adapters(base_dir: Path, out: Path, configs: dict[str, dict], seed: int = 0, b_std: float = 0.02):
    """Build a PeftModel holding one random adapter per config and save each to out/<name>."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    names = list(configs)
    peft_model = None
    for name in names:
        cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **configs[name])
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:  # PEFT's B starts at zero; random and small keeps outputs fluent but different
                p.normal_(0.0, b_std)
            elif "lora_magnitude_vector" in pname:  # DoRA starts at m = ‖W + s·B·A‖: moved, so that m / ‖…‖ is not 1
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out, selected_adapters=names)
    peft_model.eval()
    return peft_model, {name: out / name for name in names}


@pytest.fixture(scope="session")
def peft_adapters(default_model_dir, tmp_path_factory):
    return make_peft_adapters(default_model_dir, tmp_path_factory.mktemp("peft"), ADAPTER_CONFIGS)
