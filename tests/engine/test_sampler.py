"""The sampler's batched logits processors and min_p against HF transformers' own processors, row by row.

Each row of a batch carries different fields; the reference applies HF's processor for that row alone
(SequenceBiasLogitsProcessor, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
MinPLogitsWarper) and OpenAI's formula for presence/frequency, in vLLM's order.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from lora_serve.engine.logits_processors import adjust_logits
from lora_serve.engine.sampler import min_p_filter, sample
from lora_serve.engine.sampling_params import SamplingParams
from lora_serve.engine.sequence import Sequence

VOCAB = 64
EOS = {2, 5}
PROMPT = [7, 8, 8, 9, 30]
OUTPUT = [10, 11, 10, 10, 7, 40, 11]


def _seq(params: SamplingParams, output: list[int] = OUTPUT, prompt: list[int] = PROMPT) -> Sequence:
    seq = Sequence("r", list(prompt), params, torch.Generator().manual_seed(params.seed or 0))
    seq.output_token_ids = list(output)
    return seq


def _reference(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row [V] as HF's processors (and OpenAI's formula for the additive penalties) make it."""
    p, scores = seq.params, logits.unsqueeze(0).clone()
    ids = torch.tensor([seq.prompt_token_ids + seq.output_token_ids])
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()])(ids, scores)
    if p.min_tokens:
        stops = sorted(EOS | set(p.stop_token_ids))
        scores = MinNewTokensLengthLogitsProcessor(len(seq.prompt_token_ids), p.min_tokens, stops)(ids, scores)
    if p.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, scores)
    for token, count in Counter(seq.output_token_ids).items():
        scores[0, token] -= p.frequency_penalty * count + p.presence_penalty
    return scores[0]


ROWS = {
    "plain": SamplingParams(),
    "repetition": SamplingParams(repetition_penalty=1.3),
    "repetition-below-one": SamplingParams(repetition_penalty=0.7),
    "presence-frequency": SamplingParams(presence_penalty=0.5, frequency_penalty=0.7),
    "negative-penalties": SamplingParams(presence_penalty=-1.5, frequency_penalty=-0.25),
    "logit-bias": SamplingParams(logit_bias={3: 5.0, 11: -100.0, 63: 100.0}),
    "min-tokens-held": SamplingParams(min_tokens=9, stop_token_ids=[12, 13]),
    "min-tokens-reached": SamplingParams(min_tokens=7, stop_token_ids=[12]),
    "all": SamplingParams(
        temperature=0.0, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=1.1, logit_bias={2: 3.0, 10: 50.0}, min_tokens=8
    ),
}


def test_each_row_matches_hf_processors_for_that_row_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB) * 3
    seqs = [_seq(p) for p in ROWS.values()]
    adjusted = adjust_logits(logits, seqs, EOS)
    for row, (name, seq) in enumerate(zip(ROWS, seqs)):
        torch.testing.assert_close(adjusted[row], _reference(logits[row], seq), rtol=1e-6, atol=1e-6, msg=name)
    assert torch.isinf(adjusted[list(ROWS).index("min-tokens-held"), [2, 5, 12, 13]]).all()


def test_a_row_without_output_is_penalised_for_its_prompt_only() -> None:
    logits = torch.randn(1, VOCAB)
    seq = _seq(SamplingParams(repetition_penalty=1.5, frequency_penalty=2.0, presence_penalty=2.0), output=[])
    torch.testing.assert_close(adjust_logits(logits, [seq], EOS)[0], _reference(logits[0], seq))


def test_a_batch_that_asks_for_nothing_gets_its_logits_back_uncopied() -> None:
    logits = torch.randn(3, VOCAB)
    seqs = [_seq(SamplingParams()), _seq(SamplingParams(temperature=0.7, top_p=0.9, top_k=5)), _seq(SamplingParams(min_tokens=3))]
    assert adjust_logits(logits, seqs, EOS) is logits  # min_tokens 3 is reached: OUTPUT has 7 tokens


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_hf(min_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB) * 2
    ours = min_p_filter(logits, torch.full((4,), min_p))
    torch.testing.assert_close(ours, MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), logits))


def test_min_p_per_row() -> None:
    logits = torch.randn(3, VOCAB)
    min_p = [0.0, 0.2, 0.7]
    ours = min_p_filter(logits, torch.tensor(min_p))
    for row, m in enumerate(min_p):
        torch.testing.assert_close(ours[row], MinPLogitsWarper(m)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1])[0])


def test_greedy_rows_take_the_argmax_of_the_adjusted_logits() -> None:
    logits = torch.randn(2, VOCAB)
    top = int(logits[0].argmax())
    seqs = [_seq(SamplingParams(temperature=0, logit_bias={top: -100.0, 33: 100.0})), _seq(SamplingParams(temperature=0))]
    tokens, _ = sample(logits, seqs, EOS)
    assert tokens == [33, int(logits[1].argmax())]


def test_logprobs_are_the_models_own() -> None:
    """vLLM's default (logprobs_mode raw_logprobs): a forced token reports the raw model's logprob."""
    logits = torch.randn(1, VOCAB)
    seq = _seq(SamplingParams(temperature=0, logit_bias={33: 100.0}, repetition_penalty=2.0, logprobs=True, top_logprobs=2))
    tokens, (lp,) = sample(logits, [seq], EOS)
    raw = torch.log_softmax(logits[0], -1)
    assert tokens == [33] and lp is not None
    assert lp.logprob == pytest.approx(float(raw[33]))
    assert [t for t, _ in lp.top] == raw.topk(2).indices.tolist()


def test_min_p_one_is_greedy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(8, VOCAB)
    seqs = [_seq(SamplingParams(temperature=1.5, min_p=1.0, seed=i)) for i in range(8)]
    assert sample(logits, seqs, EOS)[0] == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch() -> None:
    fields = dict(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.4, logit_bias={4: 2.0})
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, min_p=0.3, seed=5),
        SamplingParams(frequency_penalty=-1.0, seed=6),
        SamplingParams(max_tokens=32, min_tokens=20, repetition_penalty=0.5, seed=7),
    ]
    torch.manual_seed(3)
    steps = [torch.randn(5, VOCAB) for _ in range(20)]
    alone = _seq(SamplingParams(seed=1234, **fields))
    shared = _seq(SamplingParams(seed=1234, **fields))
    batch = [_seq(p) for p in others[:2]] + [shared] + [_seq(p) for p in others[2:]]
    for logits in steps:
        (mine,), _ = sample(logits[2:3], [alone], EOS)
        tokens, _ = sample(logits, batch, EOS)
        assert tokens[2] == mine
        for seq, token in zip([alone, *batch], [mine, *tokens]):
            seq.output_token_ids.append(token)
