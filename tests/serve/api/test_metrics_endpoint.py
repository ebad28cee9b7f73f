"""/metrics of a real server under a few streaming requests: the engine and gRPC series move by exactly what the
clients saw (TTFT count per request, generated and prompt tokens, one inter-token gap per token after the first,
status codes per method)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.api.http_server import metrics_app
from serve.metrics import ServerMetrics

from .conftest import wait_until

MODEL = "tiny-served"


@pytest.fixture(scope="module")
def served(start_server):
    metrics = ServerMetrics()
    server = start_server(observe=metrics.observe_rpc)
    metrics.attach(server.backend, MODEL, server.backend.model_info().max_model_len)
    return server, server.serve_http(metrics_app(metrics)) + "/metrics"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def engine(name: str, **labels) -> tuple[str, tuple]:
    return "lmforge:" + name, tuple(sorted({"model_name": MODEL, **labels}.items()))


def rpc(name: str, method: str, code: str | None = None) -> tuple[str, tuple]:
    labels = {"grpc_service": "lmforge.v1.Generation", "grpc_method": method,
              "grpc_type": "server_stream" if method == "GenerateStream" else "unary"}
    if code is not None:
        labels["grpc_code"] = code
    return "lmforge:" + name, tuple(sorted(labels.items()))


def test_series_move_by_what_the_clients_saw(served):
    server, url = served
    before = scrape(url)
    num_tokens, num_prompt_tokens = [], []
    with server.client() as client:
        for max_tokens in (3, 7, 12):
            chunks = list(client.stream("Return the value", temperature=0, max_tokens=max_tokens, ignore_eos=True))
            num_tokens.append(sum(len(c.token_ids) for chunk in chunks for c in chunk.completions))
            num_prompt_tokens.append(chunks[-1].usage.prompt_tokens)
        with pytest.raises(grpc.RpcError):
            client.generate("Return", temperature=-1.0)
    after = scrape(url)

    def moved(key) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert num_tokens == [3, 7, 12]
    assert moved(engine("time_to_first_token_seconds_count")) == 3
    assert moved(engine("generation_tokens_total")) == sum(num_tokens)
    assert moved(engine("prompt_tokens_total")) == sum(num_prompt_tokens)
    assert moved(engine("inter_token_latency_seconds_count")) == sum(n - 1 for n in num_tokens)
    assert moved(engine("request_success_total", finished_reason="length")) == 3
    assert moved(engine("e2e_request_latency_seconds_count")) == 3
    assert moved(engine("request_generation_tokens_sum")) == sum(num_tokens)
    assert moved(rpc("grpc_server_handled_total", "GenerateStream", "OK")) == 3
    assert moved(rpc("grpc_server_handling_seconds_count", "GenerateStream")) == 3
    assert moved(rpc("grpc_server_handled_total", "Generate", "INVALID_ARGUMENT")) == 1
    assert after[engine("num_requests_running")] == 0 and after[engine("kv_cache_usage_perc")] >= 0.0


def test_a_cancelled_stream_counts_as_cancelled_and_aborted(served):
    server, url = served
    before = scrape(url)
    with server.client() as client:
        stream = client.stream("Return the", max_tokens=480, ignore_eos=True)
        next(stream)
        stream.cancel()
        cancelled = rpc("grpc_server_handled_total", "GenerateStream", "CANCELLED")
        wait_until(lambda: scrape(url).get(cancelled, 0.0) == before.get(cancelled, 0.0) + 1,
                   "the server to count the cancelled call")
        # The engine reports an abort with the next step's stats: run one more request.
        client.generate("Return", max_tokens=1)
    aborted = engine("request_success_total", finished_reason="abort")
    assert scrape(url)[aborted] == before[aborted] + 1
