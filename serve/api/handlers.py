"""RPC handlers for a servicer, built from the service's descriptor, with the server's rules around each call.

Every method of our services goes through the same wrapper, so no servicer repeats it:

- the request bytes are parsed here, not by grpc: garbage, or a string field holding bad UTF-8, is an
  INVALID_ARGUMENT that names the field (grpc's own parser failure would be an anonymous INTERNAL);
- `Admission` refuses the call (UNAVAILABLE while loading or draining, RESOURCE_EXHAUSTED over limits)
  and counts it in flight, so a graceful shutdown can wait for it;
- errors map to status codes: InvalidRequestError -> INVALID_ARGUMENT "<field>: <what to do>",
  anything unexpected -> INTERNAL (logged with its traceback, the client gets one line).

A cancelled call (client cancel, deadline) cancels the handler's task; the servicer's `async with
aclosing(...)` around the backend stream turns that into an abort in the engine.

With an `RpcObserver` (serve/metrics.py's `ServerMetrics.observe_rpc`), every call's status code and
duration (to its last streamed message) are reported when it ends. Calls the auth interceptor refuses
never reach these wrappers, so they are not counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import empty_pb2, message, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet

from serve.api.admission import Admission, Refused
from serve.types import InvalidRequestError

log = logging.getLogger(__name__)

# observe(service, method, grpc_type ("unary" | "server_stream"), status code name, duration in seconds)
RpcObserver = Callable[[str, str, str, str, float], None]


class Undecodable:
    """What the deserializer returns for bytes that are not a valid request (the handler refuses it)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message


def decode_request(cls: type[message.Message], data: bytes) -> message.Message | Undecodable:
    try:
        return cls.FromString(data)
    except message.DecodeError as err:
        path = first_invalid_utf8(cls.DESCRIPTOR, data)
        if path is not None:
            return Undecodable(path, "is not valid UTF-8 text; send text as UTF-8 (or token ids)")
        return Undecodable("request", f"not a valid {cls.DESCRIPTOR.full_name} ({err})")


def first_invalid_utf8(desc: _descriptor.Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path ("chat.messages[1].content") of the first string field whose bytes are not UTF-8, found by
    re-reading the wire format with every field unknown (which keeps strings as raw bytes)."""
    raw = empty_pb2.Empty()
    try:
        raw.MergeFromString(data)
    except message.DecodeError:
        return None
    seen: dict[int, int] = {}
    for item in UnknownFieldSet(raw):
        field = desc.fields_by_number.get(item.field_number)
        if field is None or item.wire_type != 2:  # 2: length-delimited (strings, bytes, messages)
            continue
        index = seen[item.field_number] = seen.get(item.field_number, -1) + 1
        path = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
        if field.type == _descriptor.FieldDescriptor.TYPE_STRING:
            try:
                item.data.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            found = first_invalid_utf8(field.message_type, item.data, path + ".")
            if found is not None:
                return found
    return None


def service_handler(service: _descriptor.ServiceDescriptor, servicer: object, admission: Admission, *,
                    model_bound: Collection[str] = (), observe: RpcObserver | None = None) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `service`, implemented by `servicer.<MethodName>(request, context)`
    (a coroutine, or an async generator for server-streaming methods). `model_bound` methods take an
    admission slot; `observe` hears how each call ended."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not supported here")
        impl = getattr(servicer, method.name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        kwargs = dict(request_deserializer=functools.partial(decode_request, request_cls),
                      response_serializer=response_cls.SerializeToString)
        needs_slot = method.name in model_bound
        report = _reporter(observe, service.full_name, method.name, method.server_streaming)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(impl, admission, needs_slot, method.full_name, report), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(impl, admission, needs_slot, method.full_name, report), **kwargs)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _reporter(observe: RpcObserver | None, service: str, method: str, streaming: bool,
              ) -> Callable[[grpc.StatusCode, float], None]:
    grpc_type = "server_stream" if streaming else "unary"

    def report(code: grpc.StatusCode, started_s: float) -> None:
        if observe is not None:
            observe(service, method, grpc_type, code.name, time.monotonic() - started_s)

    return report


def _unary(impl: Callable, admission: Admission, needs_slot: bool, name: str, report: Callable) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started_s, code = time.monotonic(), grpc.StatusCode.UNKNOWN
        try:
            try:
                if isinstance(request, Undecodable):
                    raise InvalidRequestError(request.field, request.message)
                async with admission.rpc(needs_slot=needs_slot):
                    response = await impl(request, context)
                code = grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:  # the servicer chose its own status
                code = _chosen_code(context)
                raise
            except Exception as err:  # noqa: BLE001 - every failure becomes a status, see _status
                code, message = _status(err, name)
            await context.abort(code, message)
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            report(code, started_s)

    return handle


def _streaming(impl: Callable, admission: Admission, needs_slot: bool, name: str, report: Callable) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started_s, code = time.monotonic(), grpc.StatusCode.UNKNOWN
        try:
            try:
                if isinstance(request, Undecodable):
                    raise InvalidRequestError(request.field, request.message)
                async with admission.rpc(needs_slot=needs_slot):
                    async for response in impl(request, context):
                        yield response
                code = grpc.StatusCode.OK
                return
            except grpc.aio.AbortError:  # the servicer chose its own status
                code = _chosen_code(context)
                raise
            except Exception as err:  # noqa: BLE001 - every failure becomes a status, see _status
                code, message = _status(err, name)
            await context.abort(code, message)
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            report(code, started_s)

    return handle


def _chosen_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _status(err: BaseException, name: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, Refused):
        return grpc.StatusCode[err.code], str(err)
    log.error("%s failed", name, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(err).__name__}: {err}"
