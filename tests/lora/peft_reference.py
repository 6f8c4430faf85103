"""PEFT's own greedy continuation, decoded with transformers' KV cache (not ours), and the check of an
engine run against it: the independent reference for adapter outputs."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft.helpers import DoraCaching


def reference(peft_model, adapter: str | None, prompt: list[int], n: int):
    """PEFT's greedy continuation and, per new token, the log-softmax it came from."""
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                return _greedy(peft_model, prompt, n)
        peft_model.set_adapter(adapter)
        # DoRA's column norms ‖W + s·B·A‖ depend on the weights only: PEFT's cache computes them once per
        # call instead of once per token, and is cleared after it, so a later edit of the weights is seen.
        training = peft_model.training
        with DoraCaching():
            try:
                return _greedy(peft_model, prompt, n)
            finally:
                peft_model.train().train(training)  # train() clears PEFT's DoRA caches


def _greedy(model, prompt: list[int], n: int):
    # Newer transformers call the cache argument and output `cache`; older ones, `past_key_values`.
    forward = inspect.signature(type(model.get_base_model()).forward).parameters
    name = "cache" if "cache" in forward else "past_key_values"
    ids, rows = list(prompt), []
    new, past = list(prompt), None
    for _ in range(n):  # the prompt once, then one token per forward on transformers' own cache
        out = model(input_ids=torch.tensor([new]), use_cache=True, **{name: past})
        past = getattr(out, name)
        logp = torch.log_softmax(out.logits[0, -1].float(), -1)
        rows.append(logp)
        new = [int(logp.argmax())]
        ids += new
    return ids[len(prompt) :], rows


def check_against(out: dict, ref_tokens: list[int], ref_rows: list[torch.Tensor]) -> None:
    assert out["tokens"] == ref_tokens
    for lp, row in zip(out["logprobs"], ref_rows):
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=2e-3)
        top_ids = [t for t, _ in lp.top]
        assert torch.tensor([v for _, v in lp.top]) == pytest.approx(row[top_ids], abs=2e-3)
