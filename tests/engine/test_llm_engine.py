"""End-to-end engine behaviour against transformers' `generate` as the independent reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_serve.engine.sampling_params import SamplingParams

from .conftest import make_engine
from .helpers import chat_ids, run_to_completion

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Hi",
    "Explain in one sentence why the sky is blue.",
]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, stopping at EOS like the engine does."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def greedy(n: int, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_greedy_matches_transformers_on_tiny_models(fixture, request):
    path = request.getfixturevalue(fixture)
    engine = make_engine(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Prompts longer than the llama3 scaling's original context (64) exercise the scaled RoPE.
    prompts = {f"p{i}": [(7 * i + 13 * j) % 5000 + 10 for j in range(5 + 37 * i)] for i in range(4)}
    results = run_to_completion(engine, {k: (p, greedy(24, ignore_eos=False)) for k, p in prompts.items()})
    for rid, prompt in prompts.items():
        assert results[rid]["tokens"] == hf_greedy(hf, prompt, 24), rid


@pytest.mark.slow
def test_greedy_matches_transformers_on_default_model(default_engine, hf_default):
    tok = default_engine.tokenizer
    prompts = {f"q{i}": chat_ids(tok, q) for i, q in enumerate(QUESTIONS[:3])}
    results = run_to_completion(default_engine, {k: (p, greedy(16, ignore_eos=False)) for k, p in prompts.items()})
    for rid, prompt in prompts.items():
        assert results[rid]["tokens"] == hf_greedy(hf_default, prompt, 16), rid


@pytest.mark.slow
def test_default_model_answers_paris(default_engine):
    prompt = chat_ids(default_engine.tokenizer, "What is the capital of France?")
    out = run_to_completion(default_engine, {"r": (prompt, SamplingParams(max_tokens=30, temperature=0.0))})["r"]
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"  # ended by <|im_end|>, the model's EOS
    assert out["tokens"][-1] in default_engine.eos_token_ids


@pytest.mark.slow
def test_batch_invariance_16_concurrent_vs_one_at_a_time(default_engine):
    tok = default_engine.tokenizer
    texts = [f"{QUESTIONS[i % len(QUESTIONS)]} " + "Please answer briefly. " * (i % 4) for i in range(16)]
    reqs = {f"r{i}": (chat_ids(tok, t), greedy(4 + i % 5)) for i, t in enumerate(texts)}
    together = run_to_completion(default_engine, reqs)
    for rid, req in reqs.items():
        alone = run_to_completion(default_engine, {rid: req})[rid]
        assert alone["tokens"] == together[rid]["tokens"], rid
    assert default_engine.num_running() == 0 and default_engine.kv_cache.usage == 0.0


def test_preemption_when_kv_cache_is_small_gives_same_tokens(tiny_llama_dir):
    prompts = {f"p{i}": [(11 * i + j) % 3000 + 5 for j in range(20 + 9 * i)] for i in range(8)}
    reqs = {k: (p, greedy(40)) for k, p in prompts.items()}
    roomy = run_to_completion(make_engine(tiny_llama_dir), reqs)
    # 128 usable tokens of cache (+ the padding block) for 8 sequences needing up to 123 each:
    # forces waiting and preemption.
    tight_engine = make_engine(tiny_llama_dir, kv_gb=136 * 512 / 2**30, max_num_seqs=8, block_size=8, max_model_len=128)
    assert tight_engine.kv_cache.num_usable_blocks * 8 == 128 < sum(len(p) + 40 for p in prompts.values())
    tight = run_to_completion(tight_engine, reqs)
    for rid in prompts:
        assert tight[rid]["tokens"] == roomy[rid]["tokens"], rid
        assert tight[rid]["finish_reason"] == "length"
    assert tight_engine.kv_cache.usage == 0.0


def test_seed_reproducible_whatever_the_batch(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    prompt = list(range(100, 130))
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run_to_completion(engine, {"a": (prompt, params)})["a"]["tokens"]
    crowd = {f"o{i}": (list(range(200 + i, 240)), SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)) for i in range(5)}
    together = run_to_completion(engine, {"a": (prompt, params), **crowd})
    assert together["a"]["tokens"] == alone
    other_seed = run_to_completion(engine, {"b": (prompt, SamplingParams(**{**params.__dict__, "seed": 99}))})["b"]
    assert other_seed["tokens"] != alone


def test_top_k_1_equals_greedy(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    prompt = list(range(300, 340))
    g = run_to_completion(engine, {"g": (prompt, greedy(20))})["g"]["tokens"]
    k1 = run_to_completion(engine, {"k": (prompt, SamplingParams(max_tokens=20, temperature=0.8, top_k=1, ignore_eos=True))})
    assert k1["k"]["tokens"] == g


def test_stop_token_ids_and_max_tokens(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    prompt = list(range(50, 80))
    free = run_to_completion(engine, {"f": (prompt, greedy(12))})["f"]
    assert free["finish_reason"] == "length" and len(free["tokens"]) == 12
    stop_at = free["tokens"][5]
    first = free["tokens"].index(stop_at)
    stopped = run_to_completion(
        engine, {"s": (prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]))}
    )["s"]
    assert stopped["finish_reason"] == "stop"
    assert stopped["tokens"] == free["tokens"][: first + 1]


@pytest.mark.slow
def test_stop_string_truncates_text(default_engine):
    prompt = chat_ids(default_engine.tokenizer, "What is the capital of France?")
    full = run_to_completion(default_engine, {"f": (prompt, SamplingParams(max_tokens=30, temperature=0))})["f"]["text"]
    assert "Paris" in full
    cut = run_to_completion(default_engine, {"c": (prompt, SamplingParams(max_tokens=30, temperature=0, stop=["Paris"]))})["c"]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index("Paris")]


def test_logprobs_are_log_softmax_of_the_model(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompt = list(range(400, 420))
    out = run_to_completion(
        engine, {"l": (prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=True, top_logprobs=4, ignore_eos=True))}
    )["l"]
    ids = prompt + out["tokens"]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for i, lp in enumerate(out["logprobs"]):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == out["tokens"][i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(row, 4).indices.tolist()


def test_abort_frees_kv_blocks(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    engine.add_request("x", list(range(10, 60)), greedy(100))
    engine.step()
    engine.step()
    assert engine.num_running() == 1 and engine.kv_cache.usage > 0
    engine.abort_request("x")
    assert engine.num_running() == 0 and engine.kv_cache.usage == 0.0 and not engine.has_unfinished()


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(max_tokens=4), "empty"),
        ([5] * 500, SamplingParams(max_tokens=100), "context length"),
        ([10**6], SamplingParams(max_tokens=4), "token ids"),
    ],
)
def test_requests_that_can_never_run_are_refused(tiny_llama_dir, prompt, params, message):
    engine = make_engine(tiny_llama_dir)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished()
