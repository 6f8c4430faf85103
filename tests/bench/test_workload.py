"""The trace generator: popularity and arrival distributions have the requested shape; seeds reproduce."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_serve.bench.serve_config import ClientConfig, WorkloadConfig
from lora_serve.bench.workload import adapter_ranks, gamma_gaps, make_trace

N = 20
SAMPLES = 40_000


def shares(popularity: str, **kw) -> np.ndarray:
    ranks = adapter_ranks(popularity, N, SAMPLES, np.random.default_rng(0), **kw)
    assert ranks.min() >= 0 and ranks.max() < N
    return np.bincount(ranks, minlength=N) / SAMPLES


def test_uniform_is_flat():
    assert np.allclose(shares("uniform"), 1 / N, atol=0.01)


def test_power_law_alpha_one_is_uniform():
    assert np.allclose(shares("power-law", alpha=1.0), 1 / N, atol=0.01)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.6])
def test_power_law_skews_towards_first_ranks(alpha: float):
    s = shares("power-law", alpha=alpha)
    # Exact share of rank 0 under S-LoRA's int(power(alpha) * n): P(X < 1/n) = (1/n)^alpha.
    assert s[0] == pytest.approx((1 / N) ** alpha, abs=0.01)
    assert s[:2].sum() > 2 / N * 1.5
    assert s[:5].sum() > shares("power-law", alpha=min(1.0, alpha + 0.3))[:5].sum()


def test_zipf_is_monotone_and_matches_the_law():
    s = shares("zipf", zipf_s=1.2)
    expected = 1 / np.arange(1, N + 1) ** 1.2
    assert np.allclose(s, expected / expected.sum(), atol=0.01)
    assert all(a >= b - 0.005 for a, b in zip(s, s[1:]))
    assert s[0] > s[-1] * 10


@pytest.mark.parametrize("rate,cv", [(4.0, 1.0), (10.0, 0.5), (2.0, 3.0)])
def test_gamma_gaps_have_requested_mean_and_cv(rate: float, cv: float):
    gaps = gamma_gaps(rate, cv, 200_000, np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert not gamma_gaps(math.inf, 1.0, 10, np.random.default_rng(0)).any()


def config(**kw) -> WorkloadConfig:
    return WorkloadConfig(
        adapter_prefix="a", num_adapters=10, alpha=0.5, request_rate=[5.0], input_len=[4, 9], output_len=[2, 7], num_requests=50, **kw
    )


def test_same_seed_same_trace_other_seed_differs():
    a, b, c = (list(make_trace(config(seed=s), 32000)) for s in (3, 3, 4))
    assert a == b
    assert a != c


def test_trace_respects_lengths_and_prefix_property():
    trace = list(make_trace(config(), 32000))
    assert len(trace) == 50
    assert all(4 <= r.input_len == len(r.prompt) <= 9 and 2 <= r.output_len <= 7 for r in trace)
    assert all(1000 <= t < 32000 for r in trace for t in r.prompt)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    assert list(make_trace(config().model_copy(update={"num_requests": 20}), 32000)) == trace[:20]


def test_rate_changes_only_arrivals():
    slow, fast = (list(make_trace(config(), 32000, rate)) for rate in (1.0, 100.0))
    assert [(r.adapter, r.prompt, r.output_len) for r in slow] == [(r.adapter, r.prompt, r.output_len) for r in fast]
    assert slow[-1].arrival_s > fast[-1].arrival_s * 10


def test_prompt_sets_change_only_the_prompts():
    sets = [list(make_trace(config(shared_prefix_len=4), 32000, prompt_set=k)) for k in (0, 1, 2, 1)]
    assert sets[0] == list(make_trace(config(shared_prefix_len=4), 32000))  # set 0: the trace's own prompts
    assert sets[1] == sets[3]  # reproducible

    def rest(trace):
        return [(r.adapter, r.arrival_s, r.input_len, r.output_len, r.prompt[:4]) for r in trace]  # system prompt included

    assert rest(sets[0]) == rest(sets[1]) == rest(sets[2])
    prompts = [{tuple(r.prompt[4:]) for r in trace} for trace in sets[:3]]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_duration_cuts_arrivals():
    trace = list(make_trace(config(duration=2.0).model_copy(update={"num_requests": 1000}), 32000))
    assert 0 < len(trace) < 1000 and trace[-1].arrival_s <= 2.0


def test_text_prompts_and_no_adapters():
    trace = list(make_trace(WorkloadConfig(prompt_format="text", input_len=[5], num_requests=3), 32000))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 5 and r.adapter is None for r in trace)


def test_shared_prefix_is_each_adapters_own_and_the_rest_is_unchanged():
    n = 24
    trace = list(make_trace(config(shared_prefix_len=n), 32000))
    plain = list(make_trace(config(), 32000))
    assert [(r.adapter, r.prompt[n:], r.input_len - n, r.arrival_s) for r in trace] == [
        (r.adapter, r.prompt, r.input_len, r.arrival_s) for r in plain
    ]
    prefixes: dict[str | None, set] = {}
    for r in trace:
        assert r.input_len == len(r.prompt) and all(1000 <= t < 32000 for t in r.prompt)
        prefixes.setdefault(r.adapter, set()).add(tuple(r.prompt[:n]))
    assert len(prefixes) > 3 and all(len(p) == 1 for p in prefixes.values())  # one per adapter
    assert len({p for ps in prefixes.values() for p in ps}) == len(prefixes)  # distinct across adapters
    shorter = list(make_trace(config(shared_prefix_len=n).model_copy(update={"num_requests": 20}), 32000, 100.0))
    assert [r.prompt for r in shorter] == [r.prompt for r in trace[:20]]  # the same whatever the rate and length
    base = list(make_trace(WorkloadConfig(shared_prefix_len=6, input_len=[2], num_requests=3, prompt_format="text"), 32000))
    assert all(r.prompt.split()[:6] == base[0].prompt.split()[:6] for r in base)
    assert all(len(r.prompt.split()) == 8 and r.adapter is None for r in base)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(adapters=["a"], adapter_prefix="b", num_adapters=2), "not both"),
        (dict(adapter_prefix="b"), "needs --num-adapters"),
        (dict(input_len=[5, 2]), "input-len"),
        (dict(output_len=[0]), "output-len"),
        (dict(output_len=[1, 2, 3]), "output-len"),
        (dict(request_rate=[0.0]), "request-rate"),
    ],
)
def test_bad_workloads(kw: dict, msg: str):
    with pytest.raises(ValueError, match=msg):
        WorkloadConfig(**kw)


@pytest.mark.parametrize("entry", ["ttft=500", "foo:1", "tpot:fast"])
def test_bad_goodput(entry: str):
    with pytest.raises(ValueError, match="--goodput"):
        ClientConfig(goodput=[entry])
