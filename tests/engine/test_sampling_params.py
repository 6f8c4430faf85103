"""SamplingParams' own invariants (the API checks user input before, naming the param)."""

from __future__ import annotations

import pytest
import torch

from lora_serve.engine.sampling_params import SEED_MAX, SEED_MIN, SamplingParams


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, SEED_MAX])
def test_every_64_bit_signed_seed_seeds_a_generator(seed: int):
    params = SamplingParams(seed=seed)
    assert torch.Generator().manual_seed(params.seed).initial_seed() == seed % 2**64


@pytest.mark.parametrize("seed", [SEED_MIN - 1, SEED_MAX + 1, 2**64])
def test_seed_outside_64_bit_signed_is_refused(seed: int):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)


def test_stop_token_ids_are_held_as_a_set():
    """Looked up once per generated token: O(1) however many a request gives."""
    assert SamplingParams(stop_token_ids=[3, 3, 5]).stop_token_ids == frozenset({3, 5})
    assert SamplingParams().stop_token_ids == frozenset()


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.01},
        {"frequency_penalty": float("nan")},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"min_p": 1.01},
        {"min_p": -0.1},
        {"min_tokens": -1},
        {"min_tokens": 17},  # past max_tokens (16)
        {"logit_bias": {5: 100.5}},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {5: float("nan")}},
    ],
    ids=str,
)
def test_sampling_fields_out_of_range_are_refused(fields: dict):
    with pytest.raises(ValueError, match=next(iter(fields))):
        SamplingParams(**fields)


def test_has_penalties_only_when_one_is_set():
    assert not SamplingParams(logit_bias={1: 1.0}, min_p=0.5, min_tokens=3).has_penalties
    assert all(
        SamplingParams(**{k: v}).has_penalties
        for k, v in [("presence_penalty", 0.1), ("frequency_penalty", -0.1), ("repetition_penalty", 1.1)]
    )
