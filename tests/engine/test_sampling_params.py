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
