"""DoRA adapters (PEFT use_dora=True) against PEFT itself, on the tiny random Llama: each adapter and the
base in one mixed batch, on every backend; merged mode; bad magnitude vectors refused at load.

PEFT makes the adapters (init_lora_weights=False, then B and the magnitudes moved: conftest.py), so the
DoRA scale m / ‖W + s·B·A‖ is not 1 and every term of y = bias + ratio ⊙ (W·x + s·B·A·x) is exercised.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.lora.errors import InvalidAdapterError
from lora_serve.lora.lora_model import LoRAModel
from lora_serve.model.arch import ModelArch

from ..engine.helpers import chat_ids, run_to_completion
from .conftest import ATTN, MLP, make_peft_adapters
from .peft_reference import check_against, reference
from .test_lora_model import edit_config, edit_tensors
from .test_peft_parity import params
from .test_quantized_base_parity import dequantized_hf

PROMPTS = [list(range(700, 724)), list(range(900, 917)), list(range(1200, 1231))]
DORA_ADAPTERS: dict[str, dict] = {
    "dora-attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True),
    "dora-mlp-r16": dict(r=16, lora_alpha=16, target_modules=MLP, use_dora=True),
    "dora-all-r32": dict(r=32, lora_alpha=64, target_modules="all-linear", use_dora=True, rank_pattern={"down_proj": 8}),
    "plain-r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
}
# Every adapter and the base in one batch, two rows on one DoRA adapter.
PLAN = {"a": "dora-attn-r4", "b": None, "c": "dora-mlp-r16", "d": "plain-r8", "e": "dora-all-r32", "f": "dora-attn-r4"}
B_STD = 0.05  # on the tiny model this makes every adapter change greedy tokens


@pytest.fixture(scope="module")
def dora_adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("dora"), DORA_ADAPTERS, b_std=B_STD)


def engine_for(tiny_llama_dir, paths: dict[str, Path], dtype: str = "float32", cpu_kernels: str = "off", **lora) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(dtype=dtype, cpu_kernels=cpu_kernels),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256),
        lora=LoRAConfig(max_loras=4, max_lora_rank=32, lora_modules=[f"{n}={p}" for n, p in paths.items()], **lora),
    )
    return LLMEngine.from_config(config, tiny_llama_dir)


def run_plan(engine: LLMEngine, plan: dict[str, str | None]) -> dict:
    reqs = {rid: (PROMPTS[i % len(PROMPTS)], params()) for i, rid in enumerate(plan)}
    return run_to_completion(engine, reqs, plan)


def check_plan(peft_model, outs: dict, plan: dict[str, str | None]) -> None:
    for i, (rid, adapter) in enumerate(plan.items()):
        ref_tokens, ref_rows = reference(peft_model, adapter, PROMPTS[i % len(PROMPTS)], len(outs[rid]["tokens"]))
        check_against(outs[rid], ref_tokens, ref_rows)


def full_recompute(peft_model, adapter: str, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """PEFT's greedy continuation with every token's logits recomputed from the whole sequence."""
    peft_model.set_adapter(adapter)
    ids, rows = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            rows.append(torch.log_softmax(peft_model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1))
            ids.append(int(rows[-1].argmax()))
    return ids[len(prompt) :], rows


def test_the_cached_reference_is_a_full_recompute_and_sees_edited_weights(dora_adapters):
    """The reference decodes on transformers' KV cache with PEFT's DoRA norms and B·A cached for one call."""
    peft_model, _ = dora_adapters
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["dora-attn-r4"].weight
    saved = lora_b.detach().clone()
    try:
        # Both references before any full recompute (which clears PEFT's caches itself): a B·A or norm
        # cached by the first and not cleared would be stale in the second.
        got = {}
        for scale in (1.0, 3.0):
            with torch.no_grad():
                lora_b.copy_(saved * scale)
            got[scale] = {name: reference(peft_model, name, PROMPTS[0], 6) for name in DORA_ADAPTERS}
        for name, (tokens, rows) in got[3.0].items():
            want_tokens, want_rows = full_recompute(peft_model, name, PROMPTS[0], 6)
            assert tokens == want_tokens, name
            torch.testing.assert_close(torch.stack(rows), torch.stack(want_rows), rtol=0, atol=1e-4)
        assert got[3.0]["dora-attn-r4"][1][0].sub(got[1.0]["dora-attn-r4"][1][0]).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)


def test_the_scales_are_not_one_and_change_peft_outputs(dora_adapters):
    peft_model, _ = dora_adapters
    _, base_rows = reference(peft_model, None, PROMPTS[0], 1)
    for name in DORA_ADAPTERS:
        _, rows = reference(peft_model, name, PROMPTS[0], 1)
        assert (rows[0] - base_rows[0]).abs().max() > 0.05, name
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight + layer.scaling["dora-attn-r4"] * layer.lora_B["dora-attn-r4"].weight @ layer.lora_A["dora-attn-r4"].weight
    ratio = layer.lora_magnitude_vector["dora-attn-r4"].weight / torch.linalg.vector_norm(w, dim=1)
    assert (ratio - 1).abs().max() > 0.1


BACKENDS = {
    "torch": dict(cpu_kernels="off"),
    "torch-cpu-kernels": dict(cpu_kernels="on"),
    "triton-interpreter": dict(cpu_kernels="off", lora_backend="triton"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mixed_batch_with_plain_adapters_and_the_base_matches_peft(request, monkeypatch, tiny_llama_dir, dora_adapters, backend):
    peft_model, paths = dora_adapters
    options = dict(BACKENDS[backend])
    if options["cpu_kernels"] == "on":
        request.getfixturevalue("kernels")  # skips where they cannot build
    if options.get("lora_backend") == "triton":
        pytest.importorskip("triton", reason="triton is not installed (it is only installable on Linux x86_64)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = engine_for(tiny_llama_dir, paths, cpu_kernels=options.pop("cpu_kernels"), **options)
    check_plan(peft_model, run_plan(engine, PLAN), PLAN)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_on_a_quantized_base_dora_matches_peft_on_the_dequantized_base(tiny_llama_dir, dora_adapters, scheme):
    """The DoRA scale is taken over the base the server multiplies by: the dequantized one."""
    _, paths = dora_adapters
    config = EngineConfig(
        model=ModelConfig(quantization=scheme),
        cache=CacheConfig(kv_cache_memory_gb=0.02),
        scheduler=SchedulerConfig(max_model_len=256),
        lora=LoRAConfig(max_loras=4, max_lora_rank=32, lora_modules=[f"{n}={p}" for n, p in paths.items()]),
    )
    engine = LLMEngine.from_config(config, tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(dequantized_hf(engine, tiny_llama_dir), str(paths["dora-all-r32"]), adapter_name="dora-all-r32")
    for name in ("dora-attn-r4", "dora-mlp-r16", "plain-r8"):
        peft_model.load_adapter(str(paths[name]), adapter_name=name)
    check_plan(peft_model.eval(), run_plan(engine, PLAN), PLAN)


def test_merged_dora_adapter_matches_peft_while_other_rows_see_the_base(tiny_llama_dir, dora_adapters):
    peft_model, paths = dora_adapters
    engine = engine_for(tiny_llama_dir, paths, merge="dora-all-r32")
    assert engine.adapters.merged_name == "dora-all-r32"
    plan = {**PLAN, "g": "dora-all-r32"}
    check_plan(peft_model, run_plan(engine, plan), plan)


def test_merged_weights_are_peft_merge(tiny_llama_dir, dora_adapters):
    peft_model, paths = dora_adapters
    engine = engine_for(tiny_llama_dir, paths)
    engine.merge_adapter("dora-attn-r4")
    peft_model.set_adapter("dora-attn-r4")
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q.merge()
        merged = q.base_layer.weight.clone()
        q.unmerge()
    ours = engine.model.layers[1].self_attn.qkv_proj
    torch.testing.assert_close(ours.weight[ours.slice_of("q_proj")], merged, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_unmerge_cycles_restore_every_weight_bit_for_bit(tiny_llama_dir, dora_adapters, dtype):
    _, paths = dora_adapters
    engine = engine_for(tiny_llama_dir, paths, dtype=dtype)
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for i in range(20):
        engine.merge_adapter(["dora-all-r32", "plain-r8", "dora-mlp-r16"][i % 3])
        if i % 2:
            engine.unmerge_adapter()
    engine.unmerge_adapter()
    assert [k for k, v in engine.model.state_dict().items() if not torch.equal(v, original[k])] == []


def test_a_dora_adapter_read_while_another_is_merged_gets_the_pristine_scales(tiny_llama_dir, dora_adapters):
    peft_model, paths = dora_adapters
    first = {n: paths[n] for n in ("dora-all-r32", "plain-r8")}
    engine = engine_for(tiny_llama_dir, first, merge="dora-all-r32")
    for name in ("dora-attn-r4", "dora-mlp-r16"):  # their ratios are computed now, against the merged model's pristine rows
        engine.adapters.register(name, paths[name], "lora-modules")
    engine.unmerge_adapter()
    plan = {"a": "dora-attn-r4", "b": "dora-mlp-r16", "c": None}
    check_plan(peft_model, run_plan(engine, plan), plan)


@pytest.mark.slow
def test_embedded_model_mixed_batch_matches_peft(default_model_dir, tmp_path_factory):
    peft_model, paths = make_peft_adapters(default_model_dir, tmp_path_factory.mktemp("dora-embedded"), DORA_ADAPTERS)
    config = EngineConfig(
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        lora=LoRAConfig(max_loras=4, max_lora_rank=32, lora_modules=[f"{n}={p}" for n, p in paths.items()]),
    )
    engine = LLMEngine.from_config(config, default_model_dir)
    questions = ["What is the capital of France?", "Name a fruit that is yellow.", "Say hello in one word."]
    reqs = {rid: (chat_ids(engine.tokenizer, questions[i % 3]), params()) for i, rid in enumerate(PLAN)}
    outs = run_to_completion(engine, reqs, PLAN)
    for rid, adapter in PLAN.items():
        ref_tokens, ref_rows = reference(peft_model, adapter, reqs[rid][0], len(outs[rid]["tokens"]))
        check_against(outs[rid], ref_tokens, ref_rows)


def test_the_prefix_cache_identity_covers_the_magnitudes(tiny_llama_dir, dora_adapters, tmp_path):
    _, paths = dora_adapters
    arch = ModelArch.from_dir(tiny_llama_dir)
    folder = shutil.copytree(paths["dora-attn-r4"], tmp_path / "moved")
    edit_tensors(set_first(MAGNITUDE, 2.0))(folder)
    first, moved = (LoRAModel.load("x", p, arch, 32) for p in (paths["dora-attn-r4"], folder))
    assert first.identity != moved.identity


# --- bad magnitude vectors ------------------------------------------------------------------------

MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


def set_first(name: str, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[name][0] = value

    return edit


# id -> (edit of a copy of dora-attn-r4, expected param or None, words of the message)
BAD_DORA = {
    "no magnitude vectors": (edit_tensors(lambda t: [t.pop(k) for k in list(t) if "magnitude" in k]), MAGNITUDE, "missing"),
    "one magnitude missing": (edit_tensors(lambda t: t.pop(MAGNITUDE)), MAGNITUDE, "missing"),
    "magnitude too short": (edit_tensors(lambda t: t.update({MAGNITUDE: t[MAGNITUDE][:-1].clone()})), MAGNITUDE, "shape"),
    "magnitude 2-D": (edit_tensors(lambda t: t.update({MAGNITUDE: t[MAGNITUDE].view(1, -1).clone()})), MAGNITUDE, "shape"),
    "magnitude NaN": (edit_tensors(set_first(MAGNITUDE, float("nan"))), MAGNITUDE, "NaN"),
    "magnitude Inf": (edit_tensors(set_first(MAGNITUDE, float("inf"))), MAGNITUDE, "Inf"),
    "magnitude overflows the scale": (edit_tensors(set_first(MAGNITUDE, 1e30)), "adapter_model", "DoRA scale"),
    "magnitude without use_dora": (edit_config(use_dora=False), None, "use_dora"),  # whichever magnitude comes first
    "use_dora not a bool": (edit_config(use_dora="true"), "use_dora", "true or false"),
}


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir, dora_adapters):
    _, paths = dora_adapters
    return engine_for(tiny_llama_dir, {"plain-r8": paths["plain-r8"]})


@pytest.mark.parametrize("edit, param, words", BAD_DORA.values(), ids=BAD_DORA.keys())
def test_bad_dora_adapter_is_refused_and_changes_nothing(tiny_engine, dora_adapters, tmp_path, edit, param, words):
    _, paths = dora_adapters
    folder = shutil.copytree(paths["dora-attn-r4"], tmp_path / "bad")
    edit(folder)
    before = [r.name for r in tiny_engine.adapters.list()]
    with pytest.raises(InvalidAdapterError, match=words) as info:
        tiny_engine.adapters.register("bad", folder, "lora-modules")
    assert info.value.status == 400 and (param is None or info.value.param == param)
    assert [r.name for r in tiny_engine.adapters.list()] == before
    assert tiny_engine.adapters.cpu_copy("bad") is None
