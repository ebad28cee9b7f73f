"""A real gRPC server on 127.0.0.1 (port 0) over the trained tiny checkpoint, in this process.

The server runs on its own asyncio loop in a background thread, as it would in `lmforge serve`; tests
talk to it with the real client (serve/client.py) and may look at the engine behind it (KV usage)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from serve.api.grpc_server import GrpcServer, GrpcServerConfig
from serve.backends.native import NativeBackend
from serve.client import Client

NUM_KV_BLOCKS = 64  # 1024 tokens: the served context is the model's 512; tiny memory


class BackgroundServer:
    def __init__(self, backend: NativeBackend, config: GrpcServerConfig, *, load: bool = True,
                 observe=None) -> None:
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self.thread.start()
        self.server = GrpcServer(backend, config, observe=observe)
        self.http_servers: list = []
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        if load:
            self.call(self.server.load())

    def call(self, coro, timeout_s: float = 120.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def serve_http(self, app) -> str:
        """Serve an aiohttp application (the OpenAI API, /metrics) on this server's loop; returns its base URL."""
        from serve.api.http_server import HttpServer

        http = HttpServer(app, "127.0.0.1", 0)
        port = self.call(http.start())
        self.http_servers.append(http)
        return f"http://127.0.0.1:{port}"

    def client(self, **kwargs) -> Client:
        return Client(self.target, timeout_s=60.0, **kwargs)

    @property
    def engine(self):
        return self.backend.llm_engine

    def stop(self) -> None:
        try:
            self.call(self.server.shutdown(grace_s=5.0))
            for http in self.http_servers:
                self.call(http.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def engine_config(checkpoint, **overrides):
    from serve.engine.llm_engine import EngineConfig

    return replace(EngineConfig(model=str(checkpoint), num_kv_blocks=NUM_KV_BLOCKS), **overrides)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` (a state, never a duration: the deadline only bounds a hung test)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.01)


def wait_engine_idle(engine) -> None:
    """The engine has no request left and every KV block is free again."""
    wait_until(lambda: not engine.has_unfinished_requests() and engine.kv.usage == 0.0,
               "the engine to finish or abort every request and free its KV blocks")


@pytest.fixture(scope="package")
def start_server(trained_checkpoint) -> Iterator[Callable[..., BackgroundServer]]:
    """Factory: start_server(port=0-config overrides..., engine=EngineConfig overrides, load=True, observe=RPC observer)."""
    servers: list[BackgroundServer] = []

    def start(*, engine: dict | None = None, load: bool = True, checkpoint=None, observe=None,
              **config) -> BackgroundServer:
        backend = NativeBackend(engine_config(checkpoint or trained_checkpoint, **(engine or {})))
        server = BackgroundServer(backend, GrpcServerConfig(port=0, **config), load=load, observe=observe)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="package")
def server(start_server) -> BackgroundServer:
    """The default server, shared by the tests that do not need special limits."""
    return start_server()


@pytest.fixture()
def client(server) -> Iterator[Client]:
    with server.client() as c:
        yield c
