"""Next-token choice for a batch whose rows each have their own sampling parameters.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then
draw with the sequence's own torch.Generator, so a seeded request gives the same
tokens whatever else shares its batch. Logprobs come from the unmodified model
distribution (log_softmax of the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sequence import Sequence


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [V] already divided by temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    # logits: [B, V] float32
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        probs = _filter(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue  # degenerate parameters (e.g. a denormal temperature): keep the argmax, fail nobody
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for row, i in enumerate(wanted):
            k = seqs[i].params.top_logprobs
            top: list[tuple[int, float]] = []
            if k > 0:
                vals, ids = torch.topk(lp[row], k)
                top = list(zip(ids.tolist(), vals.tolist()))
            logprobs[i] = TokenLogprob(tokens[i], float(lp[row, tokens[i]]), top)
    return tokens, logprobs
