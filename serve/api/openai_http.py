"""The OpenAI-compatible HTTP API over a Backend, on aiohttp: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health (and GET /metrics when the server keeps metrics).

The same rules as the gRPC server, through the same `Admission` object: while loading or draining every
API call gets 503, beyond the concurrency + queue limits 429, and a graceful shutdown waits for HTTP
requests as for RPCs. With a bearer token configured, every route but /health and /metrics needs
`Authorization: Bearer <token>` (what the OpenAI SDK sends as its api_key). Errors are OpenAI's JSON,
`{"error": {"message", "type", "param", "code"}}`, with 400 and `param` naming the field for bad input.
Streams are server-sent events (`data: {chunk}` ... `data: [DONE]`). A client that disconnects cancels
its handler (the runner's handler_cancellation), and leaving the backend streams aborts their requests.

Request parsing: serve/api/openai_requests.py; response JSON: serve/api/openai_responses.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from serve.api.admission import Admission, Refused, ServingState
from serve.api.openai_requests import ModelNotFound, check_model, parse_chat, parse_completion
from serve.api.openai_responses import (ChatAssembler, CompletionAssembler, merge_chat_choices,
                                        merge_completion_choices)
from serve.backends.base import Backend
from serve.types import InvalidRequestError, RequestOutput

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # never behind the bearer token (probes, Prometheus)
_REFUSED_STATUS = {"UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.type, "param": self.param,
                                            "code": self.code}}, status=self.status)


class OpenAIApi:
    def __init__(self, backend: Backend, admission: Admission, *, served_model_name: str | None = None,
                 auth_token: str | None = None,
                 observe: Callable[[str, str, int, float], None] | None = None) -> None:
        """`observe(route, method, status, duration_s)` hears every request (ServerMetrics.observe_http)."""
        self.backend = backend
        self.admission = admission
        self.served_model_name = served_model_name
        self.observe = observe
        self.created = int(time.time())
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token else None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.backend.model_info().name

    def app(self, *, max_request_bytes: int = 8 << 20,
            extra_routes: Sequence[web.RouteDef] = ()) -> web.Application:
        app = web.Application(client_max_size=max_request_bytes, middlewares=[self._middleware])
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/v1/models", self.models), web.get("/health", self.health), *extra_routes])
        return app

    # ------------------------------------------------------------------------------ routes
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        async with self.admission.rpc(needs_slot=True):
            check_model(body, self.model_name)
            req = parse_completion(body, self.backend)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name}
            assembler = CompletionAssembler(req, self.backend)
            outputs = _merged([self.backend.generate(f"{request_id}-{i}", p.token_ids, req.params)
                               for i, p in enumerate(req.prompts)])
            if req.stream:
                async def chunks() -> AsyncIterator[dict[str, Any]]:
                    async with contextlib.aclosing(outputs):
                        async for i, out in outputs:
                            for choice in assembler.deltas(i, out):
                                yield {**head, "choices": [choice]}
                    if req.include_usage:
                        yield {**head, "choices": [], "usage": assembler.usage.json()}

                return await _event_stream(request, chunks())
            deltas = []
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    deltas.extend(assembler.deltas(i, out))
            return web.json_response({**head, "choices": merge_completion_choices(deltas),
                                      "usage": assembler.usage.json()})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        async with self.admission.rpc(needs_slot=True):
            check_model(body, self.model_name)
            req = parse_chat(body, self.backend)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            head = {"id": request_id, "created": int(time.time()), "model": self.model_name}
            assembler = ChatAssembler(req, self.backend)
            outputs = self.backend.generate(request_id, req.prompt.token_ids, req.params)
            if req.stream:
                async def chunks() -> AsyncIterator[dict[str, Any]]:
                    async with contextlib.aclosing(outputs):
                        async for out in outputs:
                            choices = assembler.deltas(out)
                            if choices:
                                yield {**head, "object": "chat.completion.chunk", "choices": choices}
                    if req.include_usage:
                        yield {**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": assembler.usage.json()}

                return await _event_stream(request, chunks())
            deltas = []
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    deltas.extend(assembler.deltas(out))
            return web.json_response({**head, "object": "chat.completion", "choices": merge_chat_choices(deltas),
                                      "usage": assembler.usage.json()})

    async def models(self, request: web.Request) -> web.Response:
        self.admission.check_open()
        info = self.backend.model_info()
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
            "root": info.name, "max_model_len": info.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        state = self.admission.state
        return web.json_response({"status": state.value}, status=200 if state is ServingState.SERVING else 503)

    # ------------------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        started_s, status = time.monotonic(), 500
        try:
            response = await self._handle(request, handler)
            status = response.status
            return response
        except asyncio.CancelledError:  # the client went away
            status = 499  # nginx's "client closed request"
            raise
        finally:
            if self.observe is not None:
                route = request.match_info.route.resource
                self.observe(route.canonical if route is not None else "unmatched", request.method, status,
                             time.monotonic() - started_s)

    async def _handle(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if self._expected_auth is not None and request.path not in OPEN_PATHS:
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, self._expected_auth):
                    raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                   type_="authentication_error")
            return await handler(request)
        except ApiError as err:
            return err.response()
        except ModelNotFound as err:
            return ApiError(404, str(err), param="model", code="model_not_found").response()
        except InvalidRequestError as err:
            return ApiError(400, str(err), param=err.field).response()
        except Refused as err:
            return ApiError(_REFUSED_STATUS.get(err.code, 503), str(err), type_="server_error"
                            if err.code == "UNAVAILABLE" else "rate_limit_error").response()
        except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method, body too large
            return ApiError(err.status, f"{request.method} {request.path}: {err.reason}").response()
        except Exception as err:  # noqa: BLE001 - the client gets one line, the log the traceback
            log.exception("%s %s failed", request.method, request.path)
            return ApiError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error").response()


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _event_stream(request: web.Request, chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events. Errors after the headers went out become an error event, then [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        except (ConnectionError, asyncio.CancelledError):  # the client is gone: nothing more to write
            raise
        except Exception as err:  # noqa: BLE001 - reported in the stream, as vLLM does
            if not isinstance(err, InvalidRequestError):
                log.exception("%s %s failed while streaming", request.method, request.path)
            error = {"message": str(err), "type": "invalid_request_error" if isinstance(err, InvalidRequestError)
                     else "server_error", "param": getattr(err, "field", None), "code": None}
            await response.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, delta) from several backend streams as they come. Leaving early closes them all
    (their requests are aborted); the first failure ends the whole."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, err))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
