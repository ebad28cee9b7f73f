"""Request parsing that names the field holding bad UTF-8, and admission limits (unit tests, no server)."""

from __future__ import annotations

import asyncio

import pytest

from serve.api._gen.lmforge.v1 import common_pb2, generation_pb2, scoring_pb2
from serve.api.admission import Admission, Refused, ServingState
from serve.api.handlers import Undecodable, decode_request, first_invalid_utf8


def _corrupt(message, marker: bytes) -> bytes:
    data = message.SerializeToString()
    assert data.count(marker) == 1
    return data.replace(marker, b"\xff\xfe")


def test_bad_utf8_is_named_by_its_field_path():
    chat = generation_pb2.GenerateRequest(chat=common_pb2.Chat(messages=[
        common_pb2.ChatMessage(role="user", content="ok"), common_pb2.ChatMessage(role="user", content="XX")]))
    decoded = decode_request(generation_pb2.GenerateRequest, _corrupt(chat, b"XX"))
    assert isinstance(decoded, Undecodable) and decoded.field == "chat.messages[1].content"
    stop = generation_pb2.GenerateRequest(text="hi")
    stop.sampling.stop.extend(["a", "QQ"])
    assert first_invalid_utf8(generation_pb2.GenerateRequest.DESCRIPTOR, _corrupt(stop, b"QQ")) == "sampling.stop[1]"
    score = scoring_pb2.ScoreRequest()
    score.loglikelihood.add(context=common_pb2.TextOrTokens(text="ZZ"))
    assert first_invalid_utf8(scoring_pb2.ScoreRequest.DESCRIPTOR, _corrupt(score, b"ZZ")) == "loglikelihood[0].context.text"


def test_garbage_is_undecodable_and_good_bytes_decode():
    assert isinstance(decode_request(generation_pb2.GenerateRequest, b"\xff\xff\xff\x00 garbage"), Undecodable)
    good = generation_pb2.GenerateRequest(text="hi", priority=3)
    assert decode_request(generation_pb2.GenerateRequest, good.SerializeToString()) == good


def test_admission_states_and_limits():
    async def main():
        admission = Admission(max_concurrent_requests=1, max_queue_length=1)
        with pytest.raises(Refused) as err:
            async with admission.rpc(needs_slot=False):
                pass
        assert err.value.code == "UNAVAILABLE"  # still loading
        admission.state = ServingState.SERVING
        release = asyncio.Event()

        async def hold():
            async with admission.rpc(needs_slot=True):
                await release.wait()

        running = asyncio.create_task(hold())
        queued = asyncio.create_task(hold())
        while admission.num_queued < 1:
            await asyncio.sleep(0)
        assert (admission.num_running, admission.num_queued) == (1, 1)
        with pytest.raises(Refused) as err:
            async with admission.rpc(needs_slot=True):
                pass
        assert err.value.code == "RESOURCE_EXHAUSTED"
        async with admission.rpc(needs_slot=False):  # cheap calls (tokenize, info) take no slot
            pass
        drained = asyncio.create_task(admission.drain(grace_s=60))
        await asyncio.sleep(0)
        with pytest.raises(Refused) as err:  # draining: nothing new, not even cheap calls
            async with admission.rpc(needs_slot=False):
                pass
        assert err.value.code == "UNAVAILABLE"
        release.set()
        await asyncio.gather(running, queued)
        assert await drained and admission.num_in_flight == 0

    asyncio.run(main())
