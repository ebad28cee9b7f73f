"""Client cancel and deadlines abort the request in the engine and free its KV blocks; limits answer
RESOURCE_EXHAUSTED; a server that is still loading answers UNAVAILABLE and health NOT_SERVING."""

from __future__ import annotations

import grpc
import pytest

from .conftest import wait_engine_idle, wait_until

LONG = dict(temperature=0, max_tokens=480, ignore_eos=True)  # ~all of the 512-token context


def test_cancelled_stream_aborts_and_frees_kv_blocks(server, client):
    engine = server.engine
    wait_engine_idle(engine)
    before = engine.num_generation_tokens_total
    stream = client.stream("Return the", **LONG)
    next(stream)
    assert engine.kv.usage > 0
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_engine_idle(engine)
    assert engine.num_generation_tokens_total - before < LONG["max_tokens"]  # it stopped early


@pytest.mark.parametrize("streaming", [False, True])
def test_deadline_exceeded_aborts_and_frees_kv_blocks(server, client, streaming):
    engine = server.engine
    wait_engine_idle(engine)
    before = engine.num_generation_tokens_total
    with pytest.raises(grpc.RpcError) as err:
        if streaming:
            list(client.stream("Return the", timeout_s=0.05, **LONG))
        else:
            client.generate("Return the", timeout_s=0.05, **LONG)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_engine_idle(engine)
    assert engine.num_generation_tokens_total - before < LONG["max_tokens"]


def test_over_the_limits_is_resource_exhausted(start_server):
    server = start_server(max_concurrent_requests=1, max_queue_length=1, max_message_bytes=64 << 10)
    admission = server.server.admission
    with server.client() as client:
        running = client.stream("Return the", n=16, logprobs=20, **LONG)  # busy for seconds: cancelled below
        next(running)
        queued = client.stream("Return the", temperature=0, max_tokens=4)
        wait_until(lambda: admission.num_queued == 1, "the second stream to wait for a slot")
        for call in (lambda: client.generate("Return the", max_tokens=2),
                     lambda: list(client.stream("Return the", max_tokens=2)),
                     lambda: client.score(rolling=["Return the"])):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit" in err.value.details()
        assert client.tokenize("Return the")  # cheap calls take no slot
        with pytest.raises(grpc.RpcError) as err:  # past max_message_bytes
            client.tokenize("x" * (100 << 10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        assert list(queued)[-1].finished  # the queued one got the slot and ran
        wait_engine_idle(server.engine)
        assert client.generate("Return the", max_tokens=2).finished


def test_loading_server_is_not_serving_and_refuses(start_server):
    server = start_server(load=False)
    with server.client() as client:
        assert client.health() == "NOT_SERVING"
        assert client.health("lmforge.v1.Generation") == "NOT_SERVING"
        for call in (lambda: client.generate("x"), lambda: client.tokenize("x")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        server.call(server.server.load())
        assert client.health() == "SERVING" and client.generate("x", max_tokens=1).finished


def test_health_and_reflection(client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool

    for service in ("", "lmforge.v1.Generation", "lmforge.v1.Scoring", "lmforge.v1.Model"):
        assert client.health(service) == "SERVING"
    with pytest.raises(grpc.RpcError) as err:
        client.health("no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {"lmforge.v1.Generation", "lmforge.v1.Scoring", "lmforge.v1.Model", "grpc.health.v1.Health"} <= services
    generation = DescriptorPool(database).FindServiceByName("lmforge.v1.Generation")
    stream = generation.methods_by_name["GenerateStream"]
    assert stream.server_streaming and stream.output_type.fields_by_name["completions"].message_type.name == "Completion"
