"""Admission: whether the server takes a new RPC now, and how many it is running.

States: LOADING (the model is not ready) -> SERVING -> DRAINING (shutting down). Outside SERVING every
new RPC is refused as UNAVAILABLE, so a load balancer retries elsewhere. In SERVING, model-bound RPCs
(generate, score) take a slot: at most `max_concurrent_requests` run, at most `max_queue_length` wait
for a slot, and one more is refused as RESOURCE_EXHAUSTED at once (no unbounded queue in front of the
engine, whose own scheduler queue is bounded by what these let through).

All methods run on the server's event loop (no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator


class ServingState(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"


class Refused(Exception):
    """An RPC the server will not take now; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Admission:
    def __init__(self, max_concurrent_requests: int, max_queue_length: int) -> None:
        if max_concurrent_requests < 1 or max_queue_length < 0:
            raise ValueError("max_concurrent_requests must be >= 1 and max_queue_length >= 0")
        self.max_concurrent_requests = max_concurrent_requests
        self.max_queue_length = max_queue_length
        self.state = ServingState.LOADING
        self.num_running = 0  # model-bound RPCs holding a slot
        self.num_queued = 0   # model-bound RPCs waiting for one
        self.num_in_flight = 0  # every RPC of ours being handled, slot or not
        self._slots: asyncio.Semaphore | None = None  # created on the loop that uses it
        self._idle: asyncio.Event | None = None

    def check_open(self) -> None:
        if self.state is ServingState.LOADING:
            raise Refused("UNAVAILABLE", "the model is still loading; retry shortly (health: NOT_SERVING)")
        if self.state is ServingState.DRAINING:
            raise Refused("UNAVAILABLE", "the server is shutting down; retry on another replica")

    @contextlib.asynccontextmanager
    async def rpc(self, *, needs_slot: bool) -> AsyncIterator[None]:
        """Wrap one RPC: refused unless SERVING; a model-bound one also takes a slot (or waits in the queue)."""
        self.check_open()
        if self._idle is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_requests)
            self._idle = asyncio.Event()
        if needs_slot and self.num_running + self.num_queued >= self.max_concurrent_requests + self.max_queue_length:
            raise Refused("RESOURCE_EXHAUSTED",
                          f"the server is at its limit ({self.max_concurrent_requests} running + "
                          f"{self.max_queue_length} queued requests); retry with backoff")
        self.num_in_flight += 1
        self._idle.clear()
        try:
            if not needs_slot:
                yield
                return
            self.num_queued += 1
            try:
                await self._slots.acquire()
            finally:
                self.num_queued -= 1
            self.num_running += 1
            try:
                yield
            finally:
                self.num_running -= 1
                self._slots.release()
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stop taking RPCs and wait up to `grace_s` for the running ones; True if all finished."""
        self.state = ServingState.DRAINING
        if self.num_in_flight == 0 or self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except TimeoutError:
            return False
        return True
