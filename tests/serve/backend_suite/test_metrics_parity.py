"""The lmforge: Prometheus series are fed by every backend the same way (serve/metrics.py reads only EngineStats):
one finished request moves the same counters by the same amounts and adds one observation to each latency
histogram."""

from __future__ import annotations

import time

from .conftest import REFERENCE

NUM_TOKENS = 8
COUNTED = {  # series -> expected increase for one greedy request of NUM_TOKENS tokens
    "lmforge:generation_tokens_total": NUM_TOKENS,
    "lmforge:request_success_total": 1,
    "lmforge:time_to_first_token_seconds_count": 1,
    "lmforge:e2e_request_latency_seconds_count": 1,
    "lmforge:request_queue_time_seconds_count": 1,
    "lmforge:request_time_per_output_token_seconds_count": 1,
    "lmforge:inter_token_latency_seconds_count": NUM_TOKENS - 1,
    "lmforge:request_generation_tokens_count": 1,
}


def _sample(metrics, name: str) -> float:
    labels = {"model_name": "suite"} | ({"finished_reason": "length"} if "request_success" in name else {})
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _increase(server, prompt_ids) -> dict[str, float]:
    before = {name: _sample(server.metrics, name) for name in [*COUNTED, "lmforge:prompt_tokens_total"]}
    with server.client() as client:
        client.generate(prompt_ids, temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    deadline = time.monotonic() + 30
    while _sample(server.metrics, "lmforge:request_success_total") == before["lmforge:request_success_total"]:
        assert time.monotonic() < deadline, f"{server.name}: the finished request never reached the metrics"
        time.sleep(0.01)
    return {name: _sample(server.metrics, name) - value for name, value in before.items()}


def test_one_request_moves_the_same_series_by_the_same_amounts(all_servers):
    prompt_ids = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # fresh ids: no prefix-cache hit on either side
    increases = {name: _increase(s, prompt_ids) for name, s in all_servers.items()}
    for name, inc in increases.items():
        for series, expected in COUNTED.items():
            assert inc[series] == expected, f"{name}: {series} rose by {inc[series]}, expected {expected}"
        assert inc["lmforge:prompt_tokens_total"] == len(prompt_ids), name
    for name, s in all_servers.items():
        ttft_sum = _sample(s.metrics, "lmforge:time_to_first_token_seconds_sum")
        assert ttft_sum > 0, name
    assert set(increases) >= {REFERENCE}
