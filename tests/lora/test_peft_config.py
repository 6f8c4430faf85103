"""adapter_config.json parsing: targets, ranks and scales against PEFT itself; bad configs as a table.

PEFT is the reference: each good config is applied with `get_peft_model` to a tiny random
Llama, and the rank and `scaling` PEFT gives each LoRA layer must equal `targets()`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from lora_serve.lora.errors import InvalidAdapterError, UnsupportedAdapterError
from lora_serve.lora.peft_config import LoRAAdapterConfig
from lora_serve.model.arch import ModelArch

# GQA: q_size 64, kv_size 32; every projection has a distinct (in, out) so a transposed tensor shows.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
ARCH = ModelArch.from_dict({**TINY, "architectures": ["LlamaForCausalLM"]})
MAX_RANK = 16
BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
DROP = object()  # marks a key to delete from BASE


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def peft_targets(model: PeftModel) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, scaling) read from PEFT's own LoRA layers."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            m = re.fullmatch(r".*\.layers\.(\d+)\.\w+\.(\w+)", name)
            out[(int(m[1]), m[2])] = (module.r["default"], module.scaling["default"])
    return out


# LoraConfig kwargs: every way of choosing targets, ranks and alphas we accept.
GOOD_CONFIGS = {
    "attention r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-linear": dict(r=4, lora_alpha=32, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(q|k)_proj"),
    "rank and alpha patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6, "^model.layers.0.self_attn.k_proj": 3},
        alpha_pattern={"v_proj": 3, r"layers\.\d\.mlp\.up_proj": 5},
    ),
    "patterns with rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 8}, use_rslora=True),
    "layers_to_transform list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "layers_to_transform int + pattern": dict(r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers"),
    # An exact module name bypasses layers_to_transform in PEFT.
    "full name + layers": dict(r=4, lora_alpha=8, target_modules=["model.layers.1.mlp.up_proj", "k_proj"], layers_to_transform=[0]),
    "exclude list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    "exclude regex": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], exclude_modules=r".*\.1\..*"),
    "fan_in_fan_out ignored": dict(r=4, lora_alpha=8, target_modules=["q_proj"], fan_in_fan_out=True),
    "float alpha": dict(r=8, lora_alpha=12.5, target_modules=["gate_proj"]),
}


@pytest.mark.parametrize("kwargs", GOOD_CONFIGS.values(), ids=GOOD_CONFIGS.keys())
def test_targets_match_peft(kwargs: dict, tmp_path: Path):
    model = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    model.peft_config["default"].save_pretrained(tmp_path)  # the adapter_config.json PEFT writes
    config = LoRAAdapterConfig.from_file(tmp_path / "adapter_config.json", ARCH, MAX_RANK)
    assert config.targets(ARCH.num_layers) == peft_targets(model)


def test_all_linear_shorthand_means_every_projection():
    config = LoRAAdapterConfig.from_dict({"r": 4, "lora_alpha": 4, "target_modules": "all-linear"}, ARCH, MAX_RANK)
    assert config.targets(ARCH.num_layers) == {
        (layer, module): (4, 1.0)
        for layer in range(ARCH.num_layers)
        for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }


def test_training_only_fields_are_ignored():
    config = LoRAAdapterConfig.from_dict(
        {
            **BASE,
            "lora_dropout": 0.1,
            "init_lora_weights": "gaussian",
            "task_type": "CAUSAL_LM",
            "megatron_core": "megatron.core",
            "loftq_config": {},
            "use_dora": False,
            "modules_to_save": None,
            "bias": "none",
        },
        ARCH,
        MAX_RANK,
    )
    assert config.targets(ARCH.num_layers)[(0, "q_proj")] == (8, 2.0)


# id -> (changes to BASE, expected error, expected param)
BAD_CONFIGS = {
    "missing r": ({"r": DROP}, InvalidAdapterError, "r"),
    "missing lora_alpha": ({"lora_alpha": DROP}, InvalidAdapterError, "lora_alpha"),
    "missing target_modules": ({"target_modules": DROP}, InvalidAdapterError, "target_modules"),
    "r=0": ({"r": 0}, InvalidAdapterError, "r"),
    "r>max_rank": ({"r": MAX_RANK + 1}, InvalidAdapterError, "r"),
    "r string": ({"r": "8"}, InvalidAdapterError, "r"),
    "r float": ({"r": 8.0}, InvalidAdapterError, "r"),
    "r bool": ({"r": True}, InvalidAdapterError, "r"),
    "alpha string": ({"lora_alpha": "16"}, InvalidAdapterError, "lora_alpha"),
    "unknown target module": ({"target_modules": ["q_proj", "qkv_proj"]}, InvalidAdapterError, "target_modules"),
    "target not a list": ({"target_modules": 3}, InvalidAdapterError, "target_modules"),
    "regex matches nothing": ({"target_modules": r".*\.attn\.c_attn"}, InvalidAdapterError, "target_modules"),
    "invalid regex": ({"target_modules": "(q_proj"}, InvalidAdapterError, "target_modules"),
    "catastrophic regex": ({"target_modules": r"(?:(?:.|..)+)+y"}, InvalidAdapterError, "target_modules"),
    # RE2 refuses what it cannot match in linear time; the field and pattern are named.
    "backreference rank_pattern": ({"rank_pattern": {r"(q)_\1": 4}}, InvalidAdapterError, "rank_pattern"),
    "lookahead target_modules": ({"target_modules": r".*(?=q_proj).*"}, InvalidAdapterError, "target_modules"),
    "lookbehind exclude_modules": ({"exclude_modules": r".*(?<!k)_proj"}, InvalidAdapterError, "exclude_modules"),
    "backreference alpha_pattern": ({"alpha_pattern": {r"(v)\1": 2}}, InvalidAdapterError, "alpha_pattern"),
    "backreference layers_pattern": (
        {"layers_to_transform": [0], "layers_pattern": r"(l)\1ayers"},
        InvalidAdapterError,
        "layers_pattern",
    ),
    "pattern over 512 characters": ({"rank_pattern": {"q" * 513: 4}}, InvalidAdapterError, "rank_pattern"),
    "lm_head target": ({"target_modules": ["q_proj", "lm_head"]}, UnsupportedAdapterError, "target_modules"),
    "embed_tokens target": ({"target_modules": ["embed_tokens"]}, UnsupportedAdapterError, "target_modules"),
    "regex covers lm_head": ({"target_modules": r".*(q_proj|lm_head)"}, UnsupportedAdapterError, "target_modules"),
    "use_dora not a bool": ({"use_dora": "yes"}, InvalidAdapterError, "use_dora"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, "modules_to_save"),
    "bias all": ({"bias": "all"}, UnsupportedAdapterError, "bias"),
    "bias lora_only": ({"bias": "lora_only"}, UnsupportedAdapterError, "bias"),
    "lora_bias": ({"lora_bias": True}, UnsupportedAdapterError, "lora_bias"),
    "use_qalora": ({"use_qalora": True}, UnsupportedAdapterError, "use_qalora"),
    "aLoRA": ({"alora_invocation_tokens": [5, 6]}, UnsupportedAdapterError, "alora_invocation_tokens"),
    "trainable tokens": ({"trainable_token_indices": [1, 2]}, UnsupportedAdapterError, "trainable_token_indices"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, UnsupportedAdapterError, "layer_replication"),
    "pissa init": ({"init_lora_weights": "pissa_niter_4"}, UnsupportedAdapterError, "init_lora_weights"),
    "peft_type IA3": ({"peft_type": "IA3"}, UnsupportedAdapterError, "peft_type"),
    "rank_pattern > max_rank": ({"rank_pattern": {"q_proj": 32}}, InvalidAdapterError, "rank_pattern"),
    "rank_pattern zero": ({"rank_pattern": {"q_proj": 0}}, InvalidAdapterError, "rank_pattern"),
    "rank_pattern bad regex": ({"rank_pattern": {"q_proj[": 4}}, InvalidAdapterError, "rank_pattern"),
    "alpha_pattern not numbers": ({"alpha_pattern": {"q_proj": "x"}}, InvalidAdapterError, "alpha_pattern"),
    "rank_pattern not an object": ({"rank_pattern": [4]}, InvalidAdapterError, "rank_pattern"),
    "layers_to_transform out of range": ({"layers_to_transform": [0, 2]}, InvalidAdapterError, "layers_to_transform"),
    "layers_to_transform strings": ({"layers_to_transform": ["0"]}, InvalidAdapterError, "layers_to_transform"),
    "layers with regex targets": (
        {"target_modules": ".*q_proj", "layers_to_transform": [0]},
        InvalidAdapterError,
        "layers_to_transform",
    ),
    "layers_pattern alone": ({"layers_pattern": "layers"}, InvalidAdapterError, "layers_pattern"),
    "layers_pattern matches nothing": (
        {"layers_to_transform": [0], "layers_pattern": "h"},
        InvalidAdapterError,
        "target_modules",
    ),
}


@pytest.mark.parametrize("changes, error, param", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config(changes: dict, error: type, param: str):
    d = {k: v for k, v in {**BASE, **changes}.items() if v is not DROP}
    with pytest.raises(error) as info:
        LoRAAdapterConfig.from_dict(d, ARCH, MAX_RANK)
    assert type(info.value) is error
    assert info.value.param == param
    assert info.value.status == 400


# field -> a value with one entry more than max_entries (64 on this 2-layer base). The entries are
# patterns RE2 refuses: had any been compiled first, the error would name the pattern, not the count.
TOO_MANY = {
    "target_modules": ["q_proj"] * 65,
    "exclude_modules": [f"(a)\\1{i}" for i in range(65)],
    "rank_pattern": {f"(a)\\1{i}": 4 for i in range(4000)},
    "alpha_pattern": {f"(a)\\1{i}": 4 for i in range(65)},
    "layers_to_transform": [0] * 65,
    "layers_pattern": [f"(a)\\1{i}" for i in range(65)],
}


@pytest.mark.parametrize("param", TOO_MANY)
def test_too_many_entries_are_refused_before_any_regex_is_compiled(param: str):
    d = {**BASE, "layers_to_transform": [0], param: TOO_MANY[param]}
    with pytest.raises(InvalidAdapterError) as info:
        LoRAAdapterConfig.from_dict(d, ARCH, MAX_RANK)
    assert info.value.param == param
    assert info.value.message == f"{param} has {len(TOO_MANY[param])} entries; the limit for this base model is 64"


def test_catastrophic_patterns_are_matched_in_linear_time_without_a_timer():
    """A backtracking engine takes ~2^len(name) steps on these (the old matcher refused them after a
    0.1 s timer, and so refused valid patterns on a busy machine); RE2 matches them like any other."""
    catastrophic = r"(?:(?:.|..)+)+y"
    d = {**BASE, "rank_pattern": {catastrophic: 4, "v_proj": 2}, "exclude_modules": catastrophic}
    config = LoRAAdapterConfig.from_dict(d, ARCH, MAX_RANK)
    assert config.targets(ARCH.num_layers) == {
        (layer, module): (rank, 16 / rank) for layer in (0, 1) for module, rank in (("q_proj", 8), ("v_proj", 2))
    }


@pytest.mark.parametrize("depth", [100_000, 200], ids=["past the recursion limit", "under it"])
def test_deeply_nested_config_is_refused(depth: int, tmp_path: Path):
    path = tmp_path / "adapter_config.json"
    nested = "[" * depth + "]" * depth
    path.write_text(json.dumps(BASE)[:-1] + f', "target_modules": {nested}}}')
    with pytest.raises(InvalidAdapterError) as info:
        LoRAAdapterConfig.from_file(path, ARCH, MAX_RANK)
    assert info.value.param == ("adapter_config" if depth > 1000 else "target_modules")
    assert len(info.value.message) < 200  # the nested value is not echoed in full


@pytest.mark.parametrize("text", ["{not json", "[]", '"LORA"', "\xff\xfe"], ids=["invalid JSON", "array", "string", "not UTF-8"])
def test_bad_config_file(text: str, tmp_path: Path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InvalidAdapterError) as info:
        LoRAAdapterConfig.from_file(path, ARCH, MAX_RANK)
    assert info.value.param == "adapter_config"


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(InvalidAdapterError) as info:
        LoRAAdapterConfig.from_file(tmp_path / "adapter_config.json", ARCH, MAX_RANK)
    assert info.value.param == "adapter_config"


def test_config_round_trips_through_json(tmp_path: Path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**BASE, "use_rslora": True}))
    config = LoRAAdapterConfig.from_file(path, ARCH, MAX_RANK)
    assert config.targets(ARCH.num_layers)[(1, "v_proj")] == (8, 16 / math.sqrt(8))
    assert (0, "k_proj") not in config.targets(ARCH.num_layers)
