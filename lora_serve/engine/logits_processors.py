"""What a request's sampling fields do to its logits before the next token is chosen, greedy or drawn.

In vLLM's order, each as batched tensor ops over the rows that ask for it:
    logit_bias          logits[t] += bias[t]                                               (OpenAI)
    min_tokens          logits[t] = -inf for EOS and stop_token_ids while the output is shorter (vLLM)
    repetition_penalty  t in the prompt or output: logits[t] / p if logits[t] > 0, else logits[t] * p  (vLLM, HF)
    frequency_penalty   logits[t] -= f * count(t in the output)                           (OpenAI)
    presence_penalty    logits[t] -= p * (count(t in the output) > 0)                     (OpenAI)
A batch where no row asks for any of them gets its logits back as they are, uncopied. Every op is
elementwise or within a row, so a row's result does not depend on the rest of the batch (seeded
requests stay reproducible). Logprobs are not taken from these logits: the sampler reports the
model's own distribution, as vLLM does by default (logprobs_mode raw_logprobs).
"""

from __future__ import annotations

from collections.abc import Set

import torch

from .sequence import Sequence


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Set[int]) -> torch.Tensor:
    # logits: [B, V] float32
    biased, held, penalised = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            biased.append(i)
        if len(seq.output_token_ids) < p.min_tokens:
            held.append(i)
        if p.has_penalties:
            penalised.append(i)
    if not (biased or held or penalised):
        return logits
    logits = logits.clone()
    if biased:
        add_logit_bias(logits, seqs, biased)
    if held:
        mask_stop_tokens(logits, seqs, held, eos_token_ids)
    if penalised:
        apply_penalties(logits, seqs, penalised)
    return logits


def add_logit_bias(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    index_rows: list[int] = []
    tokens: list[int] = []
    biases: list[float] = []
    for i in rows:
        bias = seqs[i].params.logit_bias
        index_rows += [i] * len(bias)
        tokens += bias.keys()
        biases += bias.values()
    dev = logits.device
    index = (torch.tensor(index_rows, device=dev), torch.tensor(tokens, device=dev))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=dev), accumulate=True)


def mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], eos_token_ids: Set[int]) -> None:
    """min_tokens: the tokens that would end the output cannot be chosen yet (EOS even with ignore_eos, as in vLLM)."""
    index_rows: list[int] = []
    tokens: list[int] = []
    for i in rows:
        stops = {*eos_token_ids, *seqs[i].params.stop_token_ids}
        index_rows += [i] * len(stops)
        tokens += stops
    dev = logits.device
    logits[torch.tensor(index_rows, device=dev), torch.tensor(tokens, device=dev)] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    vocab_size, dev = logits.shape[1], logits.device
    params = [seqs[i].params for i in rows]
    index = torch.tensor(rows, device=dev)
    sub = logits[index]  # [R, V]
    counts = output_counts([seqs[i].output_token_ids for i in rows], vocab_size, dev)  # [R, V]
    in_output = counts > 0
    if any(p.repetition_penalty != 1 for p in params):
        seen = in_output | torch.stack([prompt_mask(seqs[i], vocab_size, dev) for i in rows])
        penalty = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
        penalty = torch.where(seen, penalty, 1.0)
        sub = torch.where(sub > 0, sub / penalty, sub * penalty)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    presence = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
    logits[index] = sub - frequency * counts - presence * in_output


def output_counts(outputs: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how many times each row's output holds each token (one scatter_add over the padded ids)."""
    width = max(map(len, outputs))
    # Padding points at an extra column, dropped after the scatter.
    padded = torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in outputs], dtype=torch.long, device=device)
    counts = torch.zeros(len(outputs), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def prompt_mask(seq: Sequence, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] bool: the tokens of seq's prompt; built at its first penalised step, then kept on the sequence."""
    if seq.prompt_mask is None:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[torch.tensor(seq.prompt_token_ids, device=device)] = True
        seq.prompt_mask = mask
    return seq.prompt_mask
