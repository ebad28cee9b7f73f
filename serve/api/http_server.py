"""The HTTP side of `lmforge serve`: the OpenAI API (`--http-port`) and Prometheus' `/metrics`
(`--metrics-port`, and on the OpenAI port too, as vLLM serves it), on aiohttp in the server's event loop.

    front = HttpFrontends(backend, grpc_server.admission, HttpConfig(...), metrics)
    lines = await front.start()   # listening (the API answers 503 until the model is loaded)
    front.loaded()                # after backend.start(): the engine series join the registry
    await front.stop()            # after the gRPC server has drained (the admission is shared)

The metrics port is plaintext and open (it carries no secrets); the OpenAI port takes the gRPC server's
bearer token and TLS certificate when it has them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from lifecycle.errors import ConfigError
from serve.api.admission import Admission
from serve.api.openai_http import OpenAIApi
from serve.backends.base import Backend
from serve.metrics import CONTENT_TYPE, ServerMetrics


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    openai_port: int | None = None  # None: no OpenAI API; 0: any free port
    metrics_port: int | None = None  # None: /metrics only on the OpenAI port (if any); 0: any free port
    served_model_name: str | None = None  # the OpenAI "model" and the metrics' model_name (default: checkpoint dir)
    metrics_vllm_names: bool = False  # also expose vllm:<name> for every lmforge:<name> twin
    max_request_bytes: int = 8 << 20
    auth_token: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        for flag, port in (("--http-port", self.openai_port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{flag}: must be in [0, 65535] (0 = any free port), got {port}")
        if self.openai_port and self.openai_port == self.metrics_port:
            raise ConfigError(f"--metrics-port: {self.metrics_port} is the --http-port too; /metrics is served "
                              "there anyway, so leave --metrics-port out or give another port")

    @property
    def keeps_metrics(self) -> bool:
        return self.openai_port is not None or self.metrics_port is not None


def metrics_route(metrics: ServerMetrics) -> web.RouteDef:
    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return web.get("/metrics", serve_metrics)


def metrics_app(metrics: ServerMetrics) -> web.Application:
    """The metrics port's application: GET /metrics only."""
    app = web.Application()
    app.add_routes([metrics_route(metrics)])
    return app


class HttpServer:
    """One aiohttp application on one TCP port."""

    def __init__(self, app: web.Application, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app, self.host, self.port, self.ssl_context = app, host, port, ssl_context
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its engine requests.
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {err.strerror} (port in use? try 0)") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HttpFrontends:
    def __init__(self, backend: Backend, admission: Admission, config: HttpConfig,
                 metrics: ServerMetrics | None) -> None:
        self.backend, self.config, self.metrics = backend, config, metrics
        self.api = OpenAIApi(backend, admission, served_model_name=config.served_model_name,
                             auth_token=config.auth_token,
                             observe=metrics.observe_http if metrics is not None else None)
        self.servers: dict[str, HttpServer] = {}

    async def start(self) -> list[str]:
        """Listen; returns one announcement line per port."""
        cfg, lines = self.config, []
        extra = [metrics_route(self.metrics)] if self.metrics is not None else []
        if cfg.openai_port is not None:
            tls = _ssl_context(cfg.tls_cert_file, cfg.tls_key_file)
            server = self.servers["openai"] = HttpServer(
                self.api.app(max_request_bytes=cfg.max_request_bytes, extra_routes=extra), cfg.host, cfg.openai_port,
                ssl_context=tls)
            port = await server.start()
            lines.append(f"OpenAI API on {'https' if tls else 'http'}://{cfg.host}:{port}/v1")
        if cfg.metrics_port is not None and self.metrics is not None:
            server = self.servers["metrics"] = HttpServer(metrics_app(self.metrics), cfg.host, cfg.metrics_port)
            port = await server.start()
            lines.append(f"metrics on http://{cfg.host}:{port}/metrics")
        return lines

    def loaded(self) -> None:
        if self.metrics is not None:
            info = self.backend.model_info()
            self.metrics.attach(self.backend, self.config.served_model_name or info.name, info.max_model_len)

    async def stop(self) -> None:
        for server in self.servers.values():
            await server.stop()


def _ssl_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    if cert_file is None or key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(Path(cert_file), Path(key_file))
    return context
