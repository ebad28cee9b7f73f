"""The gRPC server: lmforge.v1 Generation, Scoring and Model over a Backend, plus the standard
grpc.health.v1 health service and server reflection, on grpc.aio.

Lifecycle (GrpcServer):

    server = GrpcServer(backend, GrpcServerConfig(port=0))
    port = await server.start()     # listening; health NOT_SERVING, our RPCs UNAVAILABLE ("loading")
    await server.load()             # backend.start(); health SERVING
    ...
    await server.shutdown()         # health NOT_SERVING, new RPCs UNAVAILABLE, in-flight ones get
                                    # `grace_s` to finish, the rest are cancelled (their engine requests
                                    # aborted), then the backend stops

`run_server()` is that sequence for the CLI, with SIGTERM/SIGINT starting the shutdown, and the HTTP
front ends (OpenAI API, Prometheus /metrics: serve/api/http_server.py) beside it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lifecycle.errors import ConfigError
from serve.api._gen.lmforge.v1 import evaluation_pb2, generation_pb2, model_pb2, scoring_pb2
from serve.api.admission import Admission, ServingState
from serve.api.auth import BearerTokenInterceptor
from serve.api.evaluation_service import EvaluationService
from serve.api.handlers import RpcObserver, service_handler
from serve.api.services import GenerationService, ModelService, RequestIds, ScoringService
from serve.backends.base import Backend

if TYPE_CHECKING:
    from serve.api.http_server import HttpConfig

log = logging.getLogger(__name__)

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
SCORING = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"]
MODEL = model_pb2.DESCRIPTOR.services_by_name["Model"]
EVALUATION = evaluation_pb2.DESCRIPTOR.services_by_name["Evaluation"]
SERVICE_NAMES = tuple(s.full_name for s in (GENERATION, SCORING, MODEL, EVALUATION))


@dataclass(frozen=True)
class GrpcServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (start() returns it)
    max_message_bytes: int = 8 << 20  # larger requests or responses fail with RESOURCE_EXHAUSTED
    max_concurrent_requests: int = 256  # generate/score RPCs running at once
    max_queue_length: int = 1024  # generate/score RPCs waiting for a slot; beyond: RESOURCE_EXHAUSTED
    auth_token: str | None = None  # bearer token required on every RPC but health; None: no auth
    tls_cert_file: str | None = None  # PEM certificate chain; with tls_key_file: TLS only
    tls_key_file: str | None = None
    grace_s: float = 30.0  # on shutdown, how long in-flight RPCs may run on
    data_root: str | None = None  # Evaluate may read data/task files under this folder only; None: no files

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be in [0, 65535] (0 = any free port), got {self.port}")
        for name in ("max_message_bytes", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.max_queue_length < 0:
            raise ConfigError(f"--max-queue-length: must be >= 0, got {self.max_queue_length}")
        if self.grace_s < 0:
            raise ConfigError(f"--grace-s: must be >= 0, got {self.grace_s}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("--tls-cert and --tls-key: give both (TLS) or neither (plaintext)")
        for flag, path in (("--tls-cert", self.tls_cert_file), ("--tls-key", self.tls_key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag}: {path} is not a readable file")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise ConfigError(f"--data-root: {self.data_root} is not a directory")

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert_file is not None


class GrpcServer:
    def __init__(self, backend: Backend, config: GrpcServerConfig, *, lmforge_version: str | None = None,
                 observe: RpcObserver | None = None) -> None:
        """`observe` hears how every call ended (serve/metrics.py's ServerMetrics.observe_rpc)."""
        from lifecycle import __version__

        self.backend = backend
        self.config = config
        self.observe = observe
        self.admission = Admission(config.max_concurrent_requests, config.max_queue_length)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._version = lmforge_version or __version__
        self._server: grpc.aio.Server | None = None
        self._loaded = False

    async def start(self) -> int:
        """Listen (health NOT_SERVING until load()); returns the bound port."""
        cfg = self.config
        options = [("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a second server on a busy port fails instead of sharing it
        interceptors = [BearerTokenInterceptor(cfg.auth_token)] if cfg.auth_token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        ids = RequestIds()
        observe = self.observe
        server.add_generic_rpc_handlers((
            service_handler(GENERATION, GenerationService(self.backend, ids), self.admission,
                            model_bound={"Generate", "GenerateStream"}, observe=observe),
            service_handler(SCORING, ScoringService(self.backend, ids), self.admission, model_bound={"Score"},
                            observe=observe),
            service_handler(MODEL, ModelService(self.backend, self._version), self.admission, observe=observe),
            service_handler(EVALUATION, EvaluationService(self.backend, cfg.data_root, ids), self.admission,
                            model_bound={"Evaluate"}, observe=observe),
        ))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.uses_tls:
                credentials = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key_file).read_bytes(), Path(cfg.tls_cert_file).read_bytes())])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as err:  # grpc raises when it cannot bind
            raise ConfigError(f"cannot listen on {address}: {err} (port in use? try --port 0)") from None
        if not port:
            raise ConfigError(f"cannot listen on {address} (port in use? try --port 0)")
        await server.start()
        self._server, self.port = server, port
        return port

    async def load(self) -> None:
        """Start the backend (load the model); then report SERVING."""
        await self.backend.start()
        self._loaded = True
        if self.admission.state is ServingState.LOADING:  # a shutdown may have begun meanwhile
            self.admission.state = ServingState.SERVING
            for name in ("", *SERVICE_NAMES):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        finished = await self.admission.drain(grace_s)
        if not finished:
            log.warning("%d RPCs still running after %.1f s: cancelling them", self.admission.num_in_flight, grace_s)
        if self._server is not None:
            await self._server.stop(grace=1.0)  # cancels what is left; their engine requests are aborted
        if self._loaded:
            await self.backend.shutdown()


async def run_server(backend: Backend, config: GrpcServerConfig, *, announce: Callable[[str], None] = print,
                     http: HttpConfig | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. `announce` gets one line when listening
    (tests read the gRPC port from it), one per HTTP port (`http`: the OpenAI API and /metrics, sharing
    the gRPC server's admission, so limits and draining cover both) and one when ready."""
    from serve.api.http_server import HttpFrontends
    from serve.metrics import ServerMetrics

    metrics = ServerMetrics(vllm_names=http.metrics_vllm_names) if http is not None and http.keeps_metrics else None
    server = GrpcServer(backend, config, observe=metrics.observe_rpc if metrics is not None else None)
    port = await server.start()
    scheme = "TLS" if config.uses_tls else "plaintext"
    auth = ", bearer token required" if config.auth_token else ""
    announce(f"listening on {config.host}:{port} (gRPC, {scheme}{auth}); loading the model")
    front = HttpFrontends(backend, server.admission, http, metrics) if http is not None else None
    try:
        try:
            for line in await front.start() if front is not None else ():
                announce(line)
        except BaseException:  # an HTTP port is taken: stop listening on the gRPC one too
            await server.shutdown(grace_s=0)
            raise
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        load = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            stopping.cancel()
            await server.shutdown(grace_s=0)
            raise load.exception()
        if load.done():
            if front is not None:
                front.loaded()
            announce(f"ready: serving {backend.model_info().name} on {config.host}:{port}")
            await stopping
        announce(f"shutting down: waiting up to {config.grace_s:g} s for in-flight requests")
        await server.shutdown()
    finally:
        if front is not None:
            await front.stop()
    announce("stopped")
