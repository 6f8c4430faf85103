"""Next-token choice for a batch whose rows each have their own sampling parameters.

A row with a grammar (structured outputs) first has the tokens it forbids masked to -inf
(grammar_bitmask.py, in place; only those rows are copied, to be restored for the logprobs). The request's logit_bias,
min_tokens and penalties apply next, to greedy and sampled rows alike (logits_processors.py).
Greedy rows then take the argmax. Sampled rows are divided by their temperature (those with min_p
together, filtered by it as one batch), then filtered by top-k and top-p, and draw with the
sequence's own torch.Generator, so a seeded request gives the same tokens whatever else shares its
batch. Logprobs come from the unmodified model distribution (log_softmax of the raw logits, before
any mask), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Set

import torch

from .grammar_bitmask import GrammarBitmask
from .logits_processors import adjust_logits
from .logprobs import token_logprobs
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


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop the tokens less likely than min_p times the row's most likely one (vLLM's min_p; the top token stays).
    logits: [R, V] already divided by temperature, min_p: [R]."""
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _draw(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], tokens: list[int]) -> None:
    """tokens[i] for each sampled row i; logits: [B, V] after the logits processors. The rows with min_p are
    filtered as one batch; the others are divided by their temperature one row at a time (a plain batch is not copied)."""
    with_min_p = [i for i in rows if seqs[i].params.min_p > 0]
    filtered: dict[int, torch.Tensor] = {}
    if with_min_p:
        dev = logits.device
        temperature = torch.tensor([seqs[i].params.temperature for i in with_min_p], device=dev).unsqueeze(1)
        min_p = torch.tensor([seqs[i].params.min_p for i in with_min_p], device=dev)
        filtered = dict(zip(with_min_p, min_p_filter(logits[with_min_p] / temperature, min_p)))
    for i in rows:
        p = seqs[i].params
        scaled = filtered[i] if i in filtered else logits[i] / p.temperature
        probs = _filter(scaled, p.top_k, p.top_p).softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue  # degenerate parameters (e.g. a denormal temperature): keep the argmax, fail nobody
        tokens[i] = int(torch.multinomial(probs, 1, generator=seqs[i].generator))


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Set[int] = frozenset(), grammar: GrammarBitmask | None = None
) -> tuple[list[int], list[TokenLogprob | None]]:
    # logits: [B, V] float32. grammar: the masks of the rows with one (None: no row has one).
    masked = grammar.apply(logits, seqs) if grammar is not None else None
    adjusted = adjust_logits(logits, seqs, eos_token_ids)
    tokens = adjusted.argmax(-1).tolist()
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if drawn:
        _draw(adjusted, seqs, drawn, tokens)
    if grammar is not None and masked is not None:
        grammar.restore(logits, masked)  # the logprobs are the model's own, before the mask
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs]
    if wanted:
        num_top = [seqs[i].params.top_logprobs for i in wanted]
        for i, lp in zip(wanted, token_logprobs(logits[wanted], [tokens[i] for i in wanted], num_top)):
            logprobs[i] = lp
    return tokens, logprobs
