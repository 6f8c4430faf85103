"""PEFT's own greedy continuation, recomputed in full per token (no KV cache), and the check of an engine
run against it: the independent reference for adapter outputs."""

from __future__ import annotations

import pytest
import torch


def reference(peft_model, adapter: str | None, prompt: list[int], n: int):
    """PEFT's greedy continuation and, per new token, the log-softmax it came from."""
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                return _greedy(peft_model, prompt, n)
        peft_model.set_adapter(adapter)
        return _greedy(peft_model, prompt, n)


def _greedy(model, prompt: list[int], n: int):
    ids = list(prompt)
    rows = []
    for _ in range(n):  # full recompute per token: slow but independent of any KV cache
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        rows.append(logp)
        ids.append(int(logp.argmax()))
    return ids[len(prompt) :], rows


def check_against(out: dict, ref_tokens: list[int], ref_rows: list[torch.Tensor]) -> None:
    assert out["tokens"] == ref_tokens
    for lp, row in zip(out["logprobs"], ref_rows):
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=2e-3)
        top_ids = [t for t, _ in lp.top]
        assert torch.tensor([v for _, v in lp.top]) == pytest.approx(row[top_ids], abs=2e-3)
