"""Full-precision adapters on a quantized base (--quantization) against HF PEFT on the same base dequantized.

The reference is transformers' LlamaForCausalLM holding the weights the engine serves, dequantized
(QuantizedWeight.dequantize: every projection and the LM head; the embedding stays the checkpoint's),
with PEFT's own LoRA layers on top. Both multiply by the same float32 weights, so the stated tolerance
is the one of the float parity tests: greedy tokens equal for NEW_TOKENS tokens, log-probabilities
within 2e-3 (peft_reference.check_against), for base and adapter rows of one mixed batch. A sanity
check bounds how far the quantized model is from the float one. (The embedded model is converted from
a Q4_1 GGUF, so its projections already lie on a grid of 16 levels per 32 weights: int4 finds most of
them again, and int8 is the scheme that moves them.)
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from lora_serve.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.errors import QuantizedBaseError
from lora_serve.model.quantized_weight import QuantizedWeight

from ..engine.helpers import chat_ids, run_to_completion
from .conftest import ADAPTER_CONFIGS
from .peft_reference import check_against, reference

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
ADAPTERS = ("r16-all", "r8-mlp", "r4-attn")
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow."]
HF_NAMES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


def params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)


def dequantized_hf(engine: LLMEngine, model_dir) -> nn.Module:
    """transformers' Llama from model_dir holding the engine's quantized weights dequantized (LM head untied)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(engine.model.layers):
            hf_layer = hf.model.layers[i]
            for lin in layer.linears():
                assert isinstance(lin.weight, QuantizedWeight)
                w = lin.weight.dequantize()
                for name in lin.slice_names:  # new tensors: the loaded ones may share storage with other loads
                    module = hf_layer.get_submodule(f"{HF_NAMES.get(name, 'mlp')}.{name}")
                    module.weight = nn.Parameter(w[lin.slice_of(name)].clone(), requires_grad=False)
        assert isinstance(engine.model.lm_head_weight, QuantizedWeight)
        hf.lm_head.weight = nn.Parameter(engine.model.lm_head_weight.dequantize(), requires_grad=False)  # untied
    return hf


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, default_model_dir, peft_adapters):
    """(engine with the quantized base, PEFT on the dequantized base) for one scheme."""
    _, paths = peft_adapters
    config = EngineConfig(
        model=ModelConfig(quantization=request.param),
        scheduler=SchedulerConfig(max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gb=0.1),
        lora=LoRAConfig(max_loras=4, lora_modules=[f"{n}={paths[n]}" for n in ADAPTERS]),
    )
    engine = LLMEngine.from_config(config, default_model_dir)
    hf = dequantized_hf(engine, default_model_dir)
    peft_model = PeftModel.from_pretrained(hf, str(paths[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.load_adapter(str(paths[name]), adapter_name=name)
    return engine, peft_model.eval()


def test_the_reference_base_has_the_float_embedding_and_an_untied_quantized_lm_head(quantized, hf_float):
    _, peft_model = quantized
    hf = peft_model.get_base_model()
    assert torch.equal(hf.model.embed_tokens.weight, hf_float.model.embed_tokens.weight)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


def test_mixed_batch_of_base_and_adapter_rows_matches_peft_on_the_dequantized_base(quantized):
    engine, peft_model = quantized
    plan = [(ADAPTERS[0], 0), (None, 0), (ADAPTERS[1], 1), (ADAPTERS[2], 0), (None, 1)]
    reqs = {f"s{i}": (chat_ids(engine.tokenizer, PROMPTS[p]), params()) for i, (_, p) in enumerate(plan)}
    outs = run_to_completion(engine, reqs, {f"s{i}": adapter for i, (adapter, _) in enumerate(plan)})
    for i, (adapter, _) in enumerate(plan):
        ref_tokens, ref_rows = reference(peft_model, adapter, reqs[f"s{i}"][0], NEW_TOKENS)
        check_against(outs[f"s{i}"], ref_tokens, ref_rows)


def test_a_long_prefill_past_the_kernels_matches_peft(quantized):
    """A 100-token prompt is one step of more than 64 rows: the dequantize + F.linear path."""
    engine, peft_model = quantized
    prompt = chat_ids(engine.tokenizer, " ".join(["Tell me about the history of the city of Paris."] * 7))
    assert len(prompt) > 64
    out = run_to_completion(engine, {"long": (prompt, params())}, {"long": ADAPTERS[0]})["long"]
    check_against(out, *reference(peft_model, ADAPTERS[0], prompt, NEW_TOKENS))


def test_quantized_base_stays_close_to_the_float_one(quantized, hf_float):
    """Sanity, not parity: the first token's distribution of the quantized base is near the float model's
    (total variation distance between the two softmaxes)."""
    engine, peft_model = quantized
    bound = 0.1 if engine.config.model.quantization == "int8" else 0.35
    for text in PROMPTS:
        prompt = chat_ids(engine.tokenizer, text)
        with torch.inference_mode():
            want = torch.softmax(hf_float(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        _, rows = reference(peft_model, None, prompt, 1)
        tv = 0.5 * (rows[0].exp() - want).abs().sum().item()
        assert tv < bound, (engine.config.model.quantization, text, tv)


def test_merging_into_the_quantized_base_is_refused(quantized):
    engine, _ = quantized
    with pytest.raises(QuantizedBaseError, match="cannot be exact") as err:
        engine.merge_adapter(ADAPTERS[0])
    assert err.value.status == 409
    assert engine.lora.merged.name is None
    assert engine.adapters.merged_name is None


@pytest.fixture(scope="module")
def hf_float(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


assert set(ADAPTERS) <= set(ADAPTER_CONFIGS)
