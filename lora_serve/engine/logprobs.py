"""Logprobs as the engine reports them: of sampled tokens (sampler.py) and of prompt tokens
(SamplingParams.prompt_logprobs, recorded by model_runner.py in the steps that prefill the prompt).

Both come from the log_softmax of the model's raw logits, as OpenAI and vLLM report them. A prompt
token's logprob comes from the logits of the position before it, so the first prompt token has none.
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sequence import Sequence


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int], with_rank: bool = False) -> list[TokenLogprob]:
    """Row i's logprob of token_ids[i] and its num_top[i] most likely tokens, best first (with_rank: and the
    token's rank). logits: [R, V] float32, raw (no penalty, bias or temperature applied)."""
    lp = torch.log_softmax(logits, dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device).unsqueeze(1))  # [R, 1]
    ranks: list[int | None] = [None] * len(token_ids)
    if with_rank:
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    out = [TokenLogprob(t, c, rank=r) for t, c, r in zip(token_ids, chosen.squeeze(1).tolist(), ranks)]
    k = max(num_top, default=0)
    if k > 0:
        values, ids = torch.topk(lp, k, dim=-1)  # [R, k]: one topk for all rows, each cut to its own k
        for lp_out, i, v, n in zip(out, ids.tolist(), values.tolist(), num_top):
            lp_out.top = list(zip(i[:n], v[:n]))
    return out


def prompt_positions(seq: Sequence, start: int, end: int) -> range:
    """Of the positions [start, end) a step runs for `seq`, those whose logits give a prompt token's logprob
    not yet recorded: position p gives prompt token p + 1's. A prefix recomputed after a preemption records nothing twice."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(max(start, len(seq.prompt_logprobs)), min(end, seq.num_prompt_tokens - 1))


def record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, positions: range) -> None:
    """logits: [len(positions), V] float32, of those positions of seq's prompt."""
    num_top = seq.params.prompt_logprobs or 0
    next_ids = seq.prompt_token_ids[positions.start + 1 : positions.stop + 1]
    seq.prompt_logprobs += token_logprobs(logits, next_ids, [num_top] * len(next_ids), with_rank=True)
