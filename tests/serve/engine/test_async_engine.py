"""The async streaming API: per-token deltas, concurrent streams, abort on early exit frees KV blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import EngineConfig, LLMEngine
from serve.types import InvalidRequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def engines(trained_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32"))
    async_engine = AsyncEngine(engine)
    yield engine, async_engine
    async_engine.shutdown()


async def _collect(async_engine, request_id, prompt, params=GREEDY):
    deltas = []
    async for out in async_engine.generate(request_id, prompt, params):
        deltas.append(out)
    return deltas


def test_streams_per_token_deltas_matching_offline(engines, trained_checkpoint):
    engine, async_engine = engines
    prompts = ["class collections.OrderedDict", "Return the", "os.path.join(a, *p)"]

    async def main():
        return await asyncio.gather(*(_collect(async_engine, f"r{i}", p) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32")).generate(prompts, GREEDY)
    for deltas, ref in zip(streams, offline):
        assert all(len(d.outputs[0].token_ids) == 1 for d in deltas)  # one token per delta
        assert [t for d in deltas for t in d.outputs[0].token_ids] == list(ref.outputs[0].token_ids)
        assert "".join(d.outputs[0].text for d in deltas) == ref.outputs[0].text
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_leaving_early_aborts_and_frees_blocks(engines):
    engine, async_engine = engines

    async def main():
        stream = async_engine.generate("long", "Return the", SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in stream:
            assert engine.kv.usage > 0
            break  # the client goes away after the first token
        await stream.aclose()  # what a server does when its client disconnects

    asyncio.run(main())
    deadline = time.time() + 10
    while engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests()
    assert engine.kv.usage == 0.0


def test_invalid_request_raises_and_others_continue(engines):
    _, async_engine = engines

    async def main():
        good = asyncio.create_task(_collect(async_engine, "good", "Return the"))
        with pytest.raises(InvalidRequestError) as err:
            await _collect(async_engine, "bad", "")
        assert err.value.field == "prompt"
        return await good

    deltas = asyncio.run(main())
    assert deltas[-1].finished and sum(len(d.outputs[0].token_ids) for d in deltas) == 12


def test_client_loop_closing_mid_stream_does_not_kill_the_engine(engines):
    """`break` without aclose(): the generator is closed when the caller's loop shuts down; outputs
    still in flight to that closed loop must not take the engine thread down."""
    engine, async_engine = engines

    async def leave():
        async for _ in async_engine.generate("gone", "Return the", SamplingParams(max_tokens=300, ignore_eos=True)):
            break

    asyncio.run(leave())
    deltas = asyncio.run(_collect(async_engine, "next", "Return the"))  # the engine still serves
    assert deltas[-1].finished
    deadline = time.time() + 10
    while engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert engine.kv.usage == 0.0
