"""Drive an LLMEngine to completion in-process."""

from __future__ import annotations

from collections.abc import Mapping

from lora_serve.engine.llm_engine import LLMEngine
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.lora.composition import Composition


def run_to_completion(
    engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], lora: Mapping[str, str | Composition | None] | None = None
) -> dict[str, dict]:
    """Submit all requests at once, step until done; per request: token ids, text, finish reason, logprobs,
    each prompt_logprobs the outputs carried, prompt tokens found in the prefix cache (also for requests that were already in the engine)."""

    def new() -> dict:
        return {"tokens": [], "text": "", "finish_reason": None, "logprobs": [], "prompt_logprobs": [], "cached_tokens": 0}

    results = {rid: new() for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, (lora or {}).get(rid))
    while engine.has_unfinished():
        for out in engine.step():
            r = results.setdefault(out.request_id, new())
            r["tokens"] += out.new_token_ids
            r["text"] += out.new_text
            r["logprobs"] += out.new_logprobs
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"].append(out.prompt_logprobs)
            r["finish_reason"] = out.finish_reason
            r["cached_tokens"] = out.num_cached_tokens
    return results


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
