"""Aggregate metrics against hand-computed values for a few requests with known timings."""

from __future__ import annotations

import pytest

from lora_serve.bench.metrics import RequestRecord, aggregate, is_good


def records() -> list[RequestRecord]:
    # a: ttft 0.1, chunks at +0.1 +0.2 +0.3 after it, 4 tokens, e2e 0.7 -> tpot (0.7-0.1)/3 = 0.2
    a = RequestRecord(0, "x", 10, 4, ttft_s=0.1, e2el_s=0.7, itl_s=[0.1, 0.2, 0.3], output_tokens=4)
    # b: ttft 0.3, 2 tokens, e2e 0.5 -> tpot 0.2
    b = RequestRecord(1, "x", 20, 2, ttft_s=0.3, e2el_s=0.5, itl_s=[0.2], output_tokens=2)
    # c: ttft 0.5, 1 token: no tpot, no itl
    c = RequestRecord(2, "y", 30, 1, ttft_s=0.5, e2el_s=0.5, output_tokens=1)
    failed = RequestRecord(3, "y", 40, 8, error="HTTP 500: boom")
    return [a, b, c, failed]


def test_counts_and_throughputs():
    m = aggregate(records(), duration_s=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 7)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    assert m["errors"] == ["HTTP 500: boom"]
    assert m["request_goodput"] is None


def test_latency_statistics():
    m = aggregate(records(), duration_s=2.0)
    # ttft [100, 300, 500]: p90 = 300 + 0.8 * 200 = 460, p99 = 300 + 0.98 * 200 = 496
    assert m["mean_ttft_ms"] == pytest.approx(300)
    assert m["median_ttft_ms"] == pytest.approx(300)
    assert m["p90_ttft_ms"] == pytest.approx(460)
    assert m["p99_ttft_ms"] == pytest.approx(496)
    # tpot [200, 200] (c has one token)
    assert m["mean_tpot_ms"] == pytest.approx(200)
    assert m["p99_tpot_ms"] == pytest.approx(200)
    # itl [100, 200, 300, 200]: sorted 100 200 200 300; p90 at 2.7 -> 200 + 0.7 * 100 = 270
    assert m["mean_itl_ms"] == pytest.approx(200)
    assert m["median_itl_ms"] == pytest.approx(200)
    assert m["p90_itl_ms"] == pytest.approx(270)
    # e2el [700, 500, 500]
    assert m["mean_e2el_ms"] == pytest.approx(1700 / 3)
    assert m["median_e2el_ms"] == pytest.approx(500)
    assert m["p90_e2el_ms"] == pytest.approx(660)


def test_goodput():
    recs = records()
    # ttft <= 300 keeps a and b; tpot <= 150 then drops both; c has no tpot and passes that bound.
    assert aggregate(recs, 2.0, {"ttft": 300})["request_goodput"] == pytest.approx(1.0)
    assert aggregate(recs, 2.0, {"tpot": 150})["request_goodput"] == pytest.approx(0.5)
    assert aggregate(recs, 2.0, {"ttft": 300, "e2el": 600})["request_goodput"] == pytest.approx(0.5)
    assert not is_good(recs[3], {})


def test_tpot_definition():
    assert records()[0].tpot_s == pytest.approx(0.2)
    assert records()[2].tpot_s is None


def test_empty_run_has_every_key():
    m = aggregate([RequestRecord(0, "x", 1, 1, error="refused")], 1.0, {"ttft": 1})
    assert m["completed"] == 0 and m["request_goodput"] == 0.0 and m["p99_itl_ms"] == 0.0
