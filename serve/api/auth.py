"""Bearer-token authentication: every RPC except health checks must carry `authorization: Bearer <token>`.

Health stays open so load balancers and Kubernetes probes need no secret. A wrong or missing token is
UNAUTHENTICATED before the request is even parsed. The comparison is constant-time (hmac.compare_digest).
`read_bearer_token` is where the server and every client (chat, eval, bench serve) get the token from.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, *, open_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._expected = f"Bearer {token}".encode()
        self._open_prefixes = open_prefixes

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open_prefixes) or self._authorized(details):
            return handler
        return _refusal(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


_MESSAGE = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"


async def _deny(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _deny_stream(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
    yield  # pragma: no cover - makes this an async generator, as streaming handlers are


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **kwargs)


# -- where a token comes from (server and clients alike) ------------------------------------------------------


def read_bearer_token(token_file: str | None, token_env: str | None, *, flag: str = "--auth-token") -> str | None:
    """The bearer token named by `--auth-token-file` or `--auth-token-env` (None when neither is given).

    One rule for `lmforge serve`, `chat`, `eval` and `bench serve`: a source that is named must hold a
    token. A missing or empty file, or an environment variable that is unset or empty, is a ConfigError
    naming the flag and the file or variable: silently sending no token (or, on the server, serving
    without one) is never what the person meant. Surrounding whitespace (a trailing newline) is dropped.
    Secrets never come from the command line itself, where `ps` would show them.
    """
    from lifecycle.errors import ConfigError

    if token_file is not None and token_env is not None:
        raise ConfigError(f"{flag}-file and {flag}-env: give one source of the token")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{flag}-file: cannot read {token_file}: {getattr(err, 'strerror', None) or err}") from None
        if not token:
            raise ConfigError(f"{flag}-file: {token_file} is empty; put the bearer token in it")
        return token
    if token_env is not None:
        if not token_env:
            raise ConfigError(f"{flag}-env: give the name of an environment variable")
        value = os.environ.get(token_env)
        if value is None:
            raise ConfigError(f"{flag}-env: the environment variable ${token_env} is not set")
        if not value.strip():
            raise ConfigError(f"{flag}-env: the environment variable ${token_env} is empty")
        return value.strip()
    return None
