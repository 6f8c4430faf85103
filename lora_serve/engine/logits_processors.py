"""What a request's sampling fields do to its logits before the next token is chosen, greedy or drawn.

In vLLM's order, each as batched tensor ops over the rows that ask for it:
    logit_bias          logits[t] += bias[t]                                               (OpenAI)
    min_tokens          logits[t] = -inf for EOS and stop_token_ids while the output is shorter (vLLM)
    repetition_penalty  t in the prompt or output: logits[t] / p if logits[t] > 0, else logits[t] * p  (vLLM, HF)
    frequency_penalty   logits[t] -= f * count(t in the output)                           (OpenAI)
    presence_penalty    logits[t] -= p * (count(t in the output) > 0)                     (OpenAI)
A batch where no row asks for any of them gets its logits back as they are, uncopied. The penalties
touch only the (row, token) pairs of the prompts and outputs, found with one torch.unique over the
batch's keys row * V + token, so they cost O(tokens), not O(rows x vocabulary). Every op is
elementwise on distinct pairs, so a row's result does not depend on the rest of the batch (seeded
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
        if len(seq.output_token_ids) < p.min_tokens and seq.matcher is None:  # a grammar decides where it ends
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
    """Over the (row, token) pairs the rows' prompts and outputs hold, never over the whole vocabulary:
    a row's prompt and output are some hundreds of tokens, its vocabulary tens of thousands."""
    vocab_size, dev = logits.shape[1], logits.device
    params = [seqs[i].params for i in rows]
    batch_row = torch.tensor(rows, device=dev)
    # Keys row * V + token (built on the host, moved once): one per distinct token of each row's output, with its count.
    keys = torch.cat([torch.tensor(seqs[i].output_token_ids, dtype=torch.long) + r * vocab_size for r, i in enumerate(rows)])
    out_keys, out_counts = torch.unique(keys.to(dev), return_counts=True)
    if any(p.repetition_penalty != 1 for p in params):
        prompts = [prompt_tokens(seqs[i], dev) + r * vocab_size for r, i in enumerate(rows)]
        seen = torch.unique(torch.cat([out_keys, *prompts]))
        row = seen // vocab_size
        at = (batch_row[row], seen % vocab_size)
        penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)[row]
        values = logits[at]
        logits[at] = torch.where(values > 0, values / penalty, values * penalty)
    row = out_keys // vocab_size
    frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)[row]
    presence = torch.tensor([p.presence_penalty for p in params], device=dev)[row]
    logits.index_put_((batch_row[row], out_keys % vocab_size), -(frequency * out_counts + presence), accumulate=True)


def prompt_tokens(seq: Sequence, device: torch.device) -> torch.Tensor:
    """The distinct tokens of seq's prompt; found at its first penalised step, then kept on the sequence."""
    if seq.prompt_tokens is None:
        seq.prompt_tokens = torch.unique(torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=device))
    return seq.prompt_tokens
