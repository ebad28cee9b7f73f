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
        assert all(len(d.outputs[0].token_ids) >= 1 for d in deltas)  # one per step, more if the loop lagged
        assert [t for d in deltas for t in d.outputs[0].token_ids] == list(ref.outputs[0].token_ids)
        assert "".join(d.outputs[0].text for d in deltas) == ref.outputs[0].text
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_a_lagging_consumer_gets_the_backlog_as_one_delta(engines, trained_checkpoint):
    """Deltas that pile up while the consumer is busy leave as one (one message instead of one per step);
    together they are exactly the offline output, text and logprobs included."""
    engine, async_engine = engines
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    async def main():
        deltas = []
        async for out in async_engine.generate("lag", "Return the", params):
            deltas.append(out)
            if len(deltas) == 1:
                deadline = time.time() + 20  # block the loop until the engine is done: all the rest waits
                while engine.has_unfinished_requests() and time.time() < deadline:
                    time.sleep(0.01)
        return deltas

    deltas = asyncio.run(main())
    ref = LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32")).generate(["Return the"], params)[0]
    assert len(deltas) == 2 and deltas[1].finished and not deltas[0].finished
    assert [t for d in deltas for t in d.outputs[0].token_ids] == list(ref.outputs[0].token_ids)
    assert "".join(d.outputs[0].text for d in deltas) == ref.outputs[0].text
    assert [lp.chosen.token_id for d in deltas for lp in d.outputs[0].logprobs] == list(ref.outputs[0].token_ids)
    assert deltas[1].outputs[0].finish_reason is not None


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


def test_failed_step_ends_its_requests_with_error_and_the_engine_serves_on(trained_checkpoint):
    """A step that raises (here: the model runner, once) ends the requests in flight with finish reason ERROR,
    frees their blocks, reports them to on_stats as finished with ERROR, and the next request is served."""
    from serve.types import FinishReason

    engine = LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32"))
    snapshots = []
    async_engine = AsyncEngine(engine, on_stats=snapshots.append)
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_execute(*args, **kwargs)

    engine.runner.execute = failing_once
    try:
        async def main():
            return await asyncio.gather(*(_collect(async_engine, f"r{i}", "Return the") for i in range(2)))

        streams = asyncio.run(main())
        for deltas in streams:
            assert deltas[-1].finished
            assert deltas[-1].outputs[-1].finish_reason is FinishReason.ERROR
            assert sum(len(d.outputs[0].token_ids) for d in deltas) < GREEDY.max_tokens
        assert engine.kv.usage == 0.0 and not engine.has_unfinished_requests()
        finished = [f for s in snapshots for f in s.finished_requests]
        assert sorted((f.request_id, f.finish_reason) for f in finished) == [("r0", FinishReason.ERROR),
                                                                               ("r1", FinishReason.ERROR)]
        after = asyncio.run(_collect(async_engine, "after", "Return the"))
        assert after[-1].outputs[-1].finish_reason is FinishReason.LENGTH
    finally:
        async_engine.shutdown()


def test_shutdown_ends_running_streams_with_abort(trained_checkpoint):
    from serve.types import FinishReason

    engine = LLMEngine(EngineConfig(model=str(trained_checkpoint), dtype="float32"))
    async_engine = AsyncEngine(engine)

    async def main():
        deltas = []
        async for out in async_engine.generate("long", "Return the", SamplingParams(max_tokens=500, ignore_eos=True)):
            deltas.append(out)
            if len(deltas) == 2:
                await asyncio.to_thread(async_engine.shutdown)
        return deltas

    deltas = asyncio.run(asyncio.wait_for(main(), timeout=60))  # before the fix: waited forever
    assert deltas[-1].finished and deltas[-1].outputs[-1].finish_reason is FinishReason.ABORT
    assert engine.kv.usage == 0.0


def test_abort_on_an_idle_engine_shows_in_stats_at_once(engines):
    """The last request aborted: no step follows, yet the snapshot must show its blocks free."""
    engine, async_engine = engines

    async def main():
        stream = async_engine.generate("r", "Return the", SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    deadline = time.time() + 10
    while async_engine.stats().kv_cache_usage > 0 and time.time() < deadline:
        time.sleep(0.01)
    assert async_engine.stats().kv_cache_usage == 0.0 and async_engine.stats().num_running == 0
