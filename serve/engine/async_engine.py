"""AsyncEngine: the LLMEngine behind an asyncio streaming API, for the servers.

The engine is single-threaded, so one background thread owns it: it drains a command queue
(add / abort), runs `step()` while there is work, and hands every RequestOutput to the asyncio loop
of the caller that is streaming that request. Callers never touch the engine directly.

    async for delta in engine.generate("req-1", "Hello", SamplingParams(max_tokens=32)):
        ...                               # one RequestOutput per step that produced tokens

Leaving the loop early (break, an exception, the task cancelled, a client gone) aborts the request
in the engine, which frees its KV blocks on the engine thread's next turn.

Every stream ends with a finished RequestOutput, whatever happens: a step that raises ends the requests
in flight with finish reason ERROR (the engine keeps serving new ones), and `shutdown()` ends the ones
still running with ABORT, so no caller waits forever. `on_stats` receives every EngineStats snapshot
(after each step, and after commands that change the engine while it is idle, such as an abort), on the
engine thread: it must be quick and must not raise.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import logging
from collections.abc import Callable

from serve.engine.llm_engine import LLMEngine
from serve.engine.outputs import merge_outputs
from serve.types import EngineStats, FinishReason, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Add:
    request_id: str
    prompt: str | Sequence[int]
    params: SamplingParams | None
    priority: int
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    admitted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_stats: Callable[[EngineStats], None] | None = None) -> None:
        self.engine = engine
        self._on_stats = on_stats
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats: EngineStats = engine.stats()
        self._stale = False  # the engine changed outside a step (add, abort) since the last snapshot
        self._publish(self._stats)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- public
    async def generate(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas. Invalid requests raise InvalidRequestError before any delta."""
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        admitted = loop.create_future()
        self._commands.put(_Add(request_id, prompt, params, priority, loop, sink, admitted))
        await admitted  # raises the engine's admission error, if any
        finished = False
        held: list[Any] = []  # an item taken from the sink while coalescing that could not join the delta
        try:
            while True:
                item = held.pop() if held else await sink.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                # A consumer slower than the engine (a busy event loop, a slow client) finds several steps'
                # deltas waiting: they leave as one delta, as vLLM's output collector does, so a backlog costs
                # one message instead of one per step. Prompt logprobs arrive alone, never merged.
                while not item.finished and item.prompt_logprobs is None and not sink.empty():
                    nxt = sink.get_nowait()
                    if not isinstance(nxt, RequestOutput) or nxt.prompt_logprobs is not None:
                        held.append(nxt)
                        break
                    item = merge_outputs([item, nxt])
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The latest snapshot (gauges and cumulative counters; the requests finished in that step only: use
        `on_stats` to see every finished request)."""
        return self._stats

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; requests still running end with finish reason ABORT."""
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished_requests()
            try:
                while True:
                    command = self._commands.get(block=block, timeout=0.1 if block else None)
                    block = False
                    self._apply(command)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                if self._stale:  # e.g. the last request aborted: its blocks are free now, say so now
                    self._refresh_stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
                self._end_all(FinishReason.ERROR, err)
                continue
            self._refresh_stats()
            self._deliver_step(outputs)
        self._end_all(FinishReason.ABORT)  # shutdown: nobody may wait for a step that will not come

    def _refresh_stats(self) -> None:
        self._stale = False
        self._stats = self.engine.stats()
        self._publish(self._stats)

    def _publish(self, stats: EngineStats) -> None:
        if self._on_stats is not None:
            try:
                self._on_stats(stats)
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                log.exception("on_stats callback failed")

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one hand-off per event loop (each call_soon_threadsafe wakes the loop through a
        pipe: 64 streams would be 64 syscalls and 64 wake-ups per step)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:
                continue
            batches.setdefault(target[0], []).append((target[1], out))
            if out.finished:
                self._sinks.pop(out.request_id, None)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # "Event loop is closed": those callers are gone
                for _, out in items:
                    self._sinks.pop(out.request_id, None)
                    self._stale = self.engine.abort_request(out.request_id) or self._stale

    def _deliver(self, request_id: str, item: Any) -> None:
        """Hand an item to the request's event loop; a closed loop means the caller is gone: abort."""
        loop, sink = self._sinks[request_id]
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            self._sinks.pop(request_id, None)
            self._stale = self.engine.abort_request(request_id) or self._stale

    def _apply(self, command: Any) -> None:
        if command is None:
            return
        if isinstance(command, _Abort):
            self._stale = self.engine.abort_request(command.request_id) or self._stale
            if command.request_id in self._sinks:
                self._deliver(command.request_id, _DONE)
                self._sinks.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, priority=command.priority)
        except Exception as err:  # noqa: BLE001 - handed to the caller's coroutine
            try:
                command.loop.call_soon_threadsafe(_set_exception, command.admitted, err)
            except RuntimeError:  # the caller's loop is gone already
                pass
            return
        self._sinks[command.request_id] = (command.loop, command.sink)
        self._stale = True
        self._deliver_admission(command)

    def _deliver_admission(self, command: _Add) -> None:
        try:
            command.loop.call_soon_threadsafe(_set_result, command.admitted, None)
        except RuntimeError:
            self._sinks.pop(command.request_id, None)
            self._stale = self.engine.abort_request(command.request_id) or self._stale

    def _end_all(self, reason: FinishReason, err: Exception | None = None) -> None:
        """End every request in flight with `reason` (ERROR: the step raised `err`; the engine cannot tell
        whose request caused it, so all of that step's requests fail and later ones are served normally)."""
        if err is not None:
            log.error("engine step failed; ending %d request(s) with finish reason error: %r", len(self._sinks), err,
                      exc_info=err)
        finals = {request_id: self.engine.finish_request(request_id, reason) for request_id in list(self._sinks)}
        for request_id in self.engine.unfinished_request_ids():  # left without a stream: their callers left
            self.engine.finish_request(request_id, reason)
        self._refresh_stats()  # before the streams hear of it, as after a step
        for request_id, final in finals.items():
            self._deliver(request_id, final if final is not None else _DONE)
            self._sinks.pop(request_id, None)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
