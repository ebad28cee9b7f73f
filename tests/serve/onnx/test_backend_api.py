"""`lmforge serve --backend onnxruntime` through a real gRPC server on loopback: greedy (and seeded sampled) outputs
equal the native engine's on the same fp32 weights, streaming, cancellation, concurrent requests, stats, and
requests for what the backend cannot do answered INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from serve.api._gen.lmforge.v1 import generation_pb2
from serve.api.grpc_server import GrpcServerConfig
from serve.backends.onnxruntime import build_backend
from serve.types import SamplingParams
from tests.serve.api.conftest import BackgroundServer, engine_config, wait_until

PROMPTS = ["class collections.OrderedDict", "Return the", "os.path.join(a, *p)"]
MAX_TOKENS = 12
LONG = dict(temperature=0, max_tokens=480, ignore_eos=True)


@pytest.fixture(scope="module")
def server(onnx_fp32):
    server = BackgroundServer(build_backend(onnx_fp32), GrpcServerConfig(port=0))
    finished = []
    server.backend.add_stats_listener(lambda stats: finished.extend(stats.finished_requests))
    server.finished = finished
    yield server
    server.stop()


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def native(trained_checkpoint):
    from serve.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(trained_checkpoint))


def wait_idle(server) -> None:
    wait_until(lambda: not server.engine.has_unfinished_requests(), "the onnxruntime engine to go idle")


def test_greedy_unary_and_stream_equal_the_native_engine(client, native):
    expected = native.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, ref in zip(PROMPTS, expected):
        reply = client.generate(prompt, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        (completion,) = reply.completions
        assert list(completion.token_ids) == list(ref.outputs[0].token_ids)
        assert completion.text == ref.outputs[0].text
        assert completion.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert reply.usage.prompt_tokens == ref.num_prompt_tokens and reply.timings.HasField("ttft_s")
        chunks = list(client.stream(prompt, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert [t for c in chunks for comp in c.completions for t in comp.token_ids] == list(ref.outputs[0].token_ids)
        assert "".join(comp.text for c in chunks for comp in c.completions) == ref.outputs[0].text


def test_seeded_sampling_logprobs_and_stops_use_the_native_sampler(client, native):
    params = dict(temperature=0.8, top_k=40, seed=7, max_tokens=10, ignore_eos=True, logprobs=3)
    prompt_ids = client.tokenize("Return the")
    reply = client.generate(prompt_ids, **params)
    ref = native.generate([prompt_ids], SamplingParams(**params))[0].outputs[0]
    (completion,) = reply.completions
    assert list(completion.token_ids) == list(ref.token_ids)
    for got, want in zip(completion.logprobs, ref.logprobs):
        assert got.chosen.logprob == pytest.approx(want.chosen.logprob, abs=1e-4)
        assert [t.token_id for t in got.top] == [t.token_id for t in want.top] and got.chosen.text != ""
    # A stop token id ends the request as in the native engine (finish reason STOP, the id reported).
    at = next(i for i in range(1, len(ref.token_ids)) if ref.token_ids[i] not in ref.token_ids[:i])
    stopped = client.generate(prompt_ids, **params | {"stop_token_ids": [ref.token_ids[at]], "logprobs": None})
    assert list(stopped.completions[0].token_ids) == list(ref.token_ids[:at + 1])
    assert stopped.completions[0].finish_reason == generation_pb2.FINISH_REASON_STOP


def test_concurrent_requests_each_get_their_own_greedy_output(server, client, native):
    expected = native.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        with server.client() as c:
            results[i] = list(c.generate(PROMPTS[i], temperature=0, max_tokens=MAX_TOKENS,
                                         ignore_eos=True).completions[0].token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(PROMPTS))] == [list(r.outputs[0].token_ids) for r in expected]


def test_cancelled_stream_aborts_the_request(server, client):
    wait_idle(server)
    before = server.engine.num_generation_tokens_total
    stream = client.stream("Return the", **LONG)
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_idle(server)
    assert server.engine.num_generation_tokens_total - before < LONG["max_tokens"]
    # The engine thread publishes the stats snapshot holding the aborted request just after it applies the abort,
    # so "idle" can be seen a moment before the listener has the finished entry: wait for the entry itself.
    wait_until(lambda: any(f.finish_reason.value == "abort" for f in server.finished),
               "the aborted request in the published stats")


def test_stats_listener_sees_every_finished_request(server, client):
    wait_idle(server)
    server.finished.clear()
    client.generate("Return the", temperature=0, max_tokens=5, ignore_eos=True, request_id="counted")
    wait_until(lambda: any(f.request_id.endswith("counted") or f.num_generation_tokens == 5 for f in server.finished),
               "the finished request in the stats")
    (stats,) = [f for f in server.finished if f.num_generation_tokens == 5]
    assert stats.ttft_s is not None and len(stats.itl_s) == 4 and stats.finish_reason.value == "length"


def test_model_info_lists_what_the_backend_cannot_do(client):
    info = client.model_info()
    assert info.backend == "onnxruntime" and info.dtype == "float32"
    assert {"prefix_caching", "speculative_decoding", "prompt_logprobs", "n>1", "scoring"} <= set(info.unsupported_features)
    assert json.loads(info.manifest_json)["kind"] == "onnx"


@pytest.mark.parametrize("field, request_kwargs", [("n", dict(n=2)), ("prompt_logprobs", dict(prompt_logprobs=1)),
                                                   ("speculative", dict(speculative=True))])
def test_unsupported_features_are_invalid_argument_naming_the_field(client, field, request_kwargs):
    for call in (client.generate, lambda *a, **k: list(client.stream(*a, **k))):
        with pytest.raises(grpc.RpcError) as err:
            call("Return the", max_tokens=4, **request_kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:") or f"{field}:" in err.value.details()


def test_score_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as err:
        client.score(rolling=["Return the value"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "score" in err.value.details()


def test_int4_export_serves_through_the_same_api(onnx_int4):
    server = BackgroundServer(build_backend(onnx_int4), GrpcServerConfig(port=0))
    try:
        with server.client() as c:
            reply = c.generate("Return the", temperature=0, max_tokens=8, ignore_eos=True)
            assert len(reply.completions[0].token_ids) == 8
            assert json.loads(c.model_info().quantization_json)["bits"] == 4
    finally:
        server.stop()


def test_serve_config_checks_the_backend_flag(onnx_fp32):
    from lifecycle.errors import ConfigError
    from serve.launch import ServeConfig

    assert ServeConfig(model=str(onnx_fp32), backend="onnxruntime").backend == "onnxruntime"
    with pytest.raises(ConfigError, match="--backend: must be one of native, vllm, onnxruntime"):
        ServeConfig(model=str(onnx_fp32), backend="tensorrt")
    with pytest.raises(ConfigError, match="no speculative decoding"):
        ServeConfig(model=str(onnx_fp32), backend="onnxruntime", ngram=True)
