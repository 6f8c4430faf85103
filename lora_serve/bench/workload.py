"""A seeded request trace in the manner of S-LoRA's synthetic workloads (Sheng et al. 2023, sec. 7.1).

    trace = list(make_trace(WorkloadConfig(adapter_prefix="bench-", num_adapters=100, alpha=0.5), vocab_size))

Adapters, arrival gaps, lengths and prompts each come from their own Generator spawned
from the seed: the same seed gives the identical trace, a prefix of a longer trace equals
the shorter one, and a different --request-rate changes only the arrival times. With
--shared-prefix-len, every request of an adapter starts with that adapter's system prompt, drawn from
a Generator of its own seeded with (seed, adapter rank + 1; the base: 0): the same in every trace of
the seed, whatever the rate or the number of requests, and distinct across adapters.

A trace has many prompt sets (`prompt_set`): the same adapters, arrivals and lengths with other prompts
(and the same system prompts). `bench serve` gives each of its rounds, and its warm-up, a set of its
own, so no round finds an earlier one's prompts in the server's prefix cache: every round is a
cold-prompt workload, as S-LoRA's, for the adapters and the base alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .serve_config import WorkloadConfig

# Ids from here up skip the special and byte tokens at the start of most vocabularies.
FIRST_PLAIN_ID = 1000
WORDS = "the of and to in is was for on that with as by at from his her which this an are be".split()


@dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival_s: float  # since the start of the run (0 for every request when the rate is inf)
    adapter: str | None  # None: the base model (no adapters given)
    prompt: list[int] | str
    input_len: int  # tokens for token-id prompts, words for text prompts; the shared prefix included
    output_len: int  # exact (EOS ignored)


def adapter_ranks(popularity: str, n: int, size: int, rng: np.random.Generator, alpha: float = 1.0, zipf_s: float = 1.1) -> np.ndarray:
    """[size] popularity ranks in [0, n): rank 0 is the most requested."""
    if popularity == "uniform":
        return rng.integers(0, n, size)
    if popularity == "power-law":
        # S-LoRA: int(power(alpha) * n); the density alpha * x^(alpha-1) piles up near 0 for alpha < 1.
        return np.minimum((rng.power(alpha, size) * n).astype(np.int64), n - 1)
    if popularity == "zipf":
        weights = 1.0 / np.arange(1, n + 1) ** zipf_s  # bounded Zipf over n ranks
        return rng.choice(n, size, p=weights / weights.sum())
    raise ValueError(f"unknown popularity {popularity!r}")


def gamma_gaps(rate: float, cv: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size] inter-arrival seconds with mean 1/rate and coefficient of variation cv (cv=1: Poisson)."""
    if math.isinf(rate):
        return np.zeros(size)
    shape = 1.0 / cv**2  # Gamma(k, theta): mean k*theta, CV 1/sqrt(k)
    return rng.gamma(shape, 1.0 / (rate * shape), size)


def _length(bounds: list[int], rng: np.random.Generator) -> int:
    return int(bounds[0]) if len(bounds) == 1 else int(rng.integers(bounds[0], bounds[1] + 1))


def _random_prompt(config: WorkloadConfig, n: int, vocab_size: int, rng: np.random.Generator) -> list[int] | str:
    if config.prompt_format == "token-ids":
        return rng.integers(FIRST_PLAIN_ID, vocab_size, n).tolist()
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n))


def shared_prefix(config: WorkloadConfig, rank: int | None, vocab_size: int) -> list[int] | str:
    """The --shared-prefix-len system prompt of the adapter at popularity `rank` (None: the base)."""
    rng = np.random.default_rng([config.seed, 0 if rank is None else rank + 1])
    return _random_prompt(config, config.shared_prefix_len, vocab_size, rng)


def make_trace(config: WorkloadConfig, vocab_size: int, rate: float | None = None, prompt_set: int = 0) -> Iterator[RequestSpec]:
    """Requests in arrival order: num_requests of them, fewer if --duration cuts the arrivals off.
    rate: one of config.request_rate (default: the first). prompt_set: which of the seed's prompt sets
    (0: the trace's own); every other input to the trace is the same for all."""
    rate = config.request_rate[0] if rate is None else rate
    adapter_seq, arrival_seq, length_seq, prompt_seq = np.random.SeedSequence(config.seed).spawn(4)
    adapter_rng, arrival_rng, length_rng = (np.random.default_rng(s) for s in (adapter_seq, arrival_seq, length_seq))
    prompt_rng = np.random.default_rng(prompt_seq if prompt_set == 0 else prompt_seq.spawn(prompt_set)[-1])
    names = config.adapter_names()
    prefixes: dict[int | None, list[int] | str] = {}
    clock = 0.0
    for i in range(config.num_requests):
        rank = int(adapter_ranks(config.popularity, len(names), 1, adapter_rng, config.alpha, config.zipf_s)[0]) if names else None
        clock += float(gamma_gaps(rate, config.cv, 1, arrival_rng)[0])
        if config.duration is not None and clock > config.duration:
            return
        n_in, n_out = _length(config.input_len, length_rng), _length(config.output_len, length_rng)
        prompt = _random_prompt(config, n_in, vocab_size, prompt_rng)
        if config.shared_prefix_len:
            if rank not in prefixes:
                prefixes[rank] = shared_prefix(config, rank, vocab_size)
            system = prefixes[rank]
            prompt = system + prompt if isinstance(system, list) and isinstance(prompt, list) else f"{system} {prompt}"
        name = None if rank is None else names[rank]
        yield RequestSpec(i, clock, name, prompt, config.shared_prefix_len + n_in, n_out)
