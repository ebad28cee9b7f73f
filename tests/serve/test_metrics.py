"""serve/metrics.py on hand-made EngineStats: counters move by the snapshots' differences, each finished request is
observed once with vLLM's intervals, the vLLM twins keep vLLM's names and buckets, docs/METRICS.md lists exactly
the registry's series."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import (PREFIX, SPECS, SPECS_BY_NAME, ServerMetrics, build_1_2_5_buckets, exposed_series_names,
                           request_timings)
from serve.types import EngineStats, FinishedRequestStats, FinishReason

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"


class StatsSource:
    """The one Backend method ServerMetrics.attach uses."""

    def __init__(self) -> None:
        self.listeners = []

    def add_stats_listener(self, listener) -> None:
        self.listeners.append(listener)

    def step(self, stats: EngineStats) -> None:
        for listener in self.listeners:
            listener(stats)


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the exposition text, as Prometheus would parse it."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: ServerMetrics, name: str, **labels) -> float:
    return samples(metrics)[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def finished(reason=FinishReason.LENGTH, *, queue_s=0.5, ttft_s=1.5, itl_s=(0.1, 0.2, 0.3), e2e_s=2.25,
             num_prompt_tokens=7) -> FinishedRequestStats:
    return FinishedRequestStats(request_id="r", finish_reason=reason, num_prompt_tokens=num_prompt_tokens,
                                num_generation_tokens=len(itl_s) + (ttft_s is not None), queue_s=queue_s,
                                ttft_s=ttft_s, itl_s=itl_s, e2e_s=e2e_s)


@pytest.fixture()
def fed() -> tuple[ServerMetrics, StatsSource]:
    metrics, source = ServerMetrics(), StatsSource()
    metrics.attach(source, "tiny", max_model_len=512)
    return metrics, source


def test_request_timings_are_vllms_intervals():
    t = request_timings(finished())
    assert (t.queue_s, t.prefill_s, t.e2e_s) == (0.5, 1.0, 2.25)
    assert t.decode_s == pytest.approx(0.6) and t.inference_s == pytest.approx(1.6)
    assert t.time_per_output_token_s == pytest.approx(0.6 / 3)
    one_token = request_timings(finished(itl_s=()))
    assert one_token.decode_s == 0.0 and one_token.time_per_output_token_s is None
    never_started = request_timings(finished(FinishReason.ABORT, queue_s=None, ttft_s=None, itl_s=()))
    assert never_started.queue_s is None and never_started.prefill_s is None and never_started.decode_s is None


def test_counters_move_by_the_difference_of_cumulative_snapshots(fed):
    metrics, source = fed
    source.step(EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_prompt_tokens_total=10,
                            num_generation_tokens_total=4, prefix_cache_queries_tokens=10, prefix_cache_hits_tokens=0))
    source.step(EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.5, num_prompt_tokens_total=10,
                            num_generation_tokens_total=9, num_preemptions_total=1, prefix_cache_queries_tokens=26,
                            prefix_cache_hits_tokens=16, spec_draft_tokens_total=8, spec_accepted_tokens_total=5))
    assert value(metrics, "lmforge:num_requests_running") == 1 and value(metrics, "lmforge:num_requests_waiting") == 0
    assert value(metrics, "lmforge:kv_cache_usage_perc") == 0.5
    for name, want in [("prompt_tokens_total", 10), ("generation_tokens_total", 9), ("num_preemptions_total", 1),
                       ("prefix_cache_queries_total", 26), ("prefix_cache_hits_total", 16),
                       ("spec_decode_num_draft_tokens_total", 8), ("spec_decode_num_accepted_tokens_total", 5)]:
        assert value(metrics, PREFIX + name) == want, name


def test_each_finished_request_is_observed_once(fed):
    metrics, source = fed
    source.step(EngineStats(finished_requests=[finished(), finished(FinishReason.STOP_STRING)]))
    source.step(EngineStats(finished_requests=[finished(FinishReason.ABORT, queue_s=None, ttft_s=None, itl_s=(),
                                                        e2e_s=0.1)]))
    assert value(metrics, "lmforge:request_success_total", finished_reason="length") == 1
    assert value(metrics, "lmforge:request_success_total", finished_reason="stop") == 1  # stop strings are "stop"
    assert value(metrics, "lmforge:request_success_total", finished_reason="abort") == 1
    assert value(metrics, "lmforge:request_success_total", finished_reason="error") == 0
    assert value(metrics, "lmforge:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "lmforge:e2e_request_latency_seconds_sum") == pytest.approx(4.6)
    assert value(metrics, "lmforge:time_to_first_token_seconds_count") == 2  # the abort never had a first token
    assert value(metrics, "lmforge:time_to_first_token_seconds_sum") == 3.0
    assert value(metrics, "lmforge:request_queue_time_seconds_count") == 2
    assert value(metrics, "lmforge:request_prefill_time_seconds_sum") == 2.0
    assert value(metrics, "lmforge:request_decode_time_seconds_sum") == pytest.approx(1.2)
    assert value(metrics, "lmforge:inter_token_latency_seconds_count") == 6
    assert value(metrics, "lmforge:inter_token_latency_seconds_bucket", le="0.1") == 2
    assert value(metrics, "lmforge:request_time_per_output_token_seconds_count") == 2
    assert value(metrics, "lmforge:request_prompt_tokens_count") == 3
    assert value(metrics, "lmforge:request_prompt_tokens_bucket", le="10.0") == 3
    assert value(metrics, "lmforge:request_generation_tokens_sum") == 8


def test_api_series_count_calls_by_code_and_status():
    metrics = ServerMetrics()
    metrics.observe_rpc("lmforge.v1.Generation", "GenerateStream", "server_stream", "OK", 0.2)
    metrics.observe_rpc("lmforge.v1.Generation", "GenerateStream", "server_stream", "INVALID_ARGUMENT", 0.01)
    metrics.observe_http("/v1/completions", "POST", 400, 0.01)
    got = samples(metrics)
    stream = (("grpc_method", "GenerateStream"), ("grpc_service", "lmforge.v1.Generation"),
              ("grpc_type", "server_stream"))
    assert got[("lmforge:grpc_server_handled_total", tuple(sorted((*stream, ("grpc_code", "OK")))))] == 1
    assert got[("lmforge:grpc_server_handling_seconds_count", stream)] == 2
    assert got[("lmforge:http_requests_total",
                (("handler", "/v1/completions"), ("method", "POST"), ("status", "400")))] == 1


def test_vllm_twins_have_vllms_buckets():
    """Parity with vllm/v1/metrics/loggers.py (PrometheusStatLogger), values as vLLM writes them."""
    ttft = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0, 160.0, 640.0, 2560.0]
    per_token = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0]
    request = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0]
    want = {"time_to_first_token_seconds": ttft, "inter_token_latency_seconds": per_token,
            "request_time_per_output_token_seconds": per_token, "e2e_request_latency_seconds": request,
            "request_queue_time_seconds": request, "request_inference_time_seconds": request,
            "request_prefill_time_seconds": request, "request_decode_time_seconds": request}
    for name, buckets in want.items():
        assert list(SPECS_BY_NAME[PREFIX + name].buckets) == buckets, name
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)  # vLLM's docstring example
    assert build_1_2_5_buckets(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)


def test_vllm_names_expose_the_twins_under_their_vllm_names():
    metrics, source = ServerMetrics(vllm_names=True), StatsSource()
    metrics.attach(source, "tiny", max_model_len=512)
    metrics.observe_rpc("lmforge.v1.Model", "GetModelInfo", "unary", "OK", 0.01)
    source.step(EngineStats(num_generation_tokens_total=5, finished_requests=[finished()]))
    got = {name: v for (name, labels), v in samples(metrics).items()}
    for twin in ("time_to_first_token_seconds_count", "generation_tokens_total", "request_success_total",
                 "num_requests_running", "prefix_cache_hits_total"):
        assert got["vllm:" + twin] == got["lmforge:" + twin], twin
    assert not any(name.startswith("vllm:grpc") for name in got) and "lmforge:grpc_server_handled_total" in got
    assert not any(name.startswith("vllm:") for name, _ in samples(ServerMetrics()))


def test_docs_table_lists_exactly_the_registry():
    rows = re.findall(r"^\| `(lmforge:[a-z0-9_:]+)` \| (\w+) \| (\w+) \| ([a-z_, ]+) \| (.+) \|$", DOC.read_text(),
                      re.MULTILINE)
    documented = {name: (kind, unit, tuple(label.strip() for label in labels.split(",")), meaning)
                  for name, kind, unit, labels, meaning in rows}
    assert set(documented) == {spec.full_name for spec in SPECS}
    for spec in SPECS:
        kind, unit, labels, meaning = documented[spec.full_name]
        assert (kind, unit, labels) == (spec.kind, spec.unit, spec.labels), spec.full_name
        assert meaning.startswith("vLLM twin.") == spec.vllm, spec.full_name


def test_exposed_series_are_what_the_registry_writes(fed):
    metrics, source = fed
    source.step(EngineStats(finished_requests=[finished()]))
    metrics.observe_rpc("s", "m", "unary", "OK", 0.1)
    metrics.observe_http("/v1/models", "GET", 200, 0.1)
    written = {name for name, _ in samples(metrics) if not name.endswith("_created")}
    assert written == exposed_series_names()
