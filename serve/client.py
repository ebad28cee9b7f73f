"""A small synchronous Python client of the lmforge.v1 gRPC API (used by tests, and by chat, eval and bench).

    from serve.client import Client

    with Client("127.0.0.1:50051") as client:
        reply = client.generate("def fib(n):", max_tokens=32, temperature=0)
        print(reply.completions[0].text, reply.usage.completion_tokens)
        for chunk in client.stream([{"role": "user", "content": "Hi!"}], max_tokens=64):
            print(chunk.completions[0].text if chunk.completions else "", end="", flush=True)
        scores = client.score(loglikelihood=[("The capital of France is", [" Paris", " Rome"])])
        print([c.logprob for c in scores.loglikelihood[0].continuations])

A prompt is a str (text), a sequence of ints (token ids) or a sequence of chat messages (dicts with
"role" and "content", or (role, content) pairs). Sampling parameters are keyword arguments named as in
SamplingParams (protos/lmforge/v1/sampling.proto); an unknown name raises TypeError here, a bad value
comes back as grpc.RpcError with code INVALID_ARGUMENT naming the field. Responses are the generated
protobuf messages. `stream()` returns grpc's call object: iterate it, or `.cancel()` it (the server
aborts the request and frees its KV cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from serve.api._gen.lmforge.v1 import (common_pb2, evaluation_pb2, evaluation_pb2_grpc, generation_pb2,
                                       generation_pb2_grpc, model_pb2, model_pb2_grpc, sampling_pb2, scoring_pb2,
                                       scoring_pb2_grpc)
from serve.api._gen.lmforge.v1.common_pb2 import ChatMessage

Prompt = str | Sequence[int] | Sequence[Mapping[str, str] | tuple[str, str] | ChatMessage]
SAMPLING_FIELDS = frozenset(f.name for f in sampling_pb2.SamplingParams.DESCRIPTOR.fields)
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20


def sampling_params(**kwargs: Any) -> sampling_pb2.SamplingParams:
    unknown = set(kwargs) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameters {sorted(unknown)}; known: {', '.join(sorted(SAMPLING_FIELDS))}")
    return sampling_pb2.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def chat(messages: Iterable[Mapping[str, str] | tuple[str, str] | ChatMessage]) -> common_pb2.Chat:
    out = common_pb2.Chat()
    for m in messages:
        if isinstance(m, ChatMessage):
            out.messages.append(m)
        elif isinstance(m, Mapping):
            out.messages.add(role=m["role"], content=m["content"])
        else:
            role, content = m
            out.messages.add(role=role, content=content)
    return out


def generate_request(prompt: Prompt, *, request_id: str = "", priority: int = 0,
                     **sampling: Any) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(sampling=sampling_params(**sampling), request_id=request_id,
                                             priority=priority)
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(t, int) for t in prompt):
        request.token_ids.ids.extend(prompt)
    elif prompt:
        request.chat.CopyFrom(chat(prompt))
    else:
        raise ValueError("prompt is empty: give text, token ids or chat messages")
    return request


def text_or_tokens(value: str | Sequence[int]) -> common_pb2.TextOrTokens:
    if isinstance(value, str):
        return common_pb2.TextOrTokens(text=value)
    return common_pb2.TextOrTokens(tokens=common_pb2.TokenIds(ids=list(value)))


class Client:
    """One channel to one server. `token`: bearer token; `root_certificates`: PEM bytes of the CA (or the
    self-signed certificate) to trust, which turns TLS on (`tls=True` alone trusts the system's CAs)."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, server_name: str | None = None,
                 timeout_s: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.scoring = scoring_pb2_grpc.ScoringStub(self.channel)
        self.model = model_pb2_grpc.ModelStub(self.channel)
        self.evaluation = evaluation_pb2_grpc.EvaluationStub(self.channel)

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, *, timeout_s: float | None = None, request_id: str = "", priority: int = 0,
                 **sampling: Any) -> generation_pb2.GenerateResponse:
        request = generate_request(prompt, request_id=request_id, priority=priority, **sampling)
        return self.generation.Generate(request, **self._call(timeout_s))

    def stream(self, prompt: Prompt, *, timeout_s: float | None = None, request_id: str = "", priority: int = 0,
               **sampling: Any) -> Iterator[generation_pb2.GenerateResponse]:
        request = generate_request(prompt, request_id=request_id, priority=priority, **sampling)
        return self.generation.GenerateStream(request, **self._call(timeout_s))

    # -- scoring ----------------------------------------------------------------------------------------
    def score(self, loglikelihood: Iterable[tuple[str | Sequence[int], Sequence[str | Sequence[int]]]] = (),
              rolling: Iterable[str | Sequence[int]] = (), *, return_token_logprobs: bool = False,
              timeout_s: float | None = None, request_id: str = "", priority: int = 0) -> scoring_pb2.ScoreResponse:
        """`loglikelihood`: (context, [continuation, ...]) pairs; `rolling`: texts scored whole."""
        request = scoring_pb2.ScoreRequest(return_token_logprobs=return_token_logprobs, request_id=request_id,
                                           priority=priority)
        for context, continuations in loglikelihood:
            request.loglikelihood.add(context=text_or_tokens(context),
                                      continuations=[text_or_tokens(c) for c in continuations])
        for text in rolling:
            request.rolling.add(text=text_or_tokens(text))
        return self.scoring.Score(request, **self._call(timeout_s))

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, *, task_spec: str | None = None, task_file: str | None = None,
                 items: Sequence[Mapping[str, Any]] = (), data_files: Sequence[str] = (), limit: int | None = None,
                 max_concurrency: int | None = None, return_items: bool = False, request_id: str = "",
                 timeout_s: float | None = None) -> Iterator[evaluation_pb2.EvaluateResponse]:
        """A server-side evaluation job: progress messages, then the result (the last message). Give the task
        as a task file's text (`task_spec`) or a name (`task_file`); records inline (`items`) or under the
        server's --data-root (`data_files`, else the task's own `data`)."""
        from google.protobuf import struct_pb2

        request = evaluation_pb2.EvaluateRequest(data_files=list(data_files), return_items=return_items,
                                                 request_id=request_id, limit=limit, max_concurrency=max_concurrency)
        if (task_spec is None) == (task_file is None):
            raise ValueError("give task_spec (a task file's text) or task_file (a name), not both")
        if task_spec is not None:
            request.task_spec = task_spec
        else:
            request.task_file = task_file
        for item in items:
            struct = struct_pb2.Struct()
            struct.update(dict(item))
            request.items.append(struct)
        return self.evaluation.Evaluate(request, **self._call(timeout_s))

    # -- model ------------------------------------------------------------------------------------------
    def model_info(self, *, timeout_s: float | None = None) -> model_pb2.ModelInfo:
        return self.model.GetModelInfo(model_pb2.ModelInfoRequest(), **self._call(timeout_s))

    def tokenize(self, text_or_chat: str | Sequence[Any], *, timeout_s: float | None = None) -> list[int]:
        request = (model_pb2.TokenizeRequest(text=text_or_chat) if isinstance(text_or_chat, str)
                   else model_pb2.TokenizeRequest(chat=chat(text_or_chat)))
        return list(self.model.Tokenize(request, **self._call(timeout_s)).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                   timeout_s: float | None = None) -> str:
        request = model_pb2.DetokenizeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.model.Detokenize(request, **self._call(timeout_s)).text

    def health(self, service: str = "", *, timeout_s: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... of the standard grpc.health.v1 service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        """Block until health says SERVING (the model is loaded); TimeoutError after `timeout_s`."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            ready = grpc.channel_ready_future(self.channel)
            try:
                ready.result(timeout=max(0.1, deadline - time.monotonic()))
                if self.health() == "SERVING":
                    return
            except (grpc.RpcError, grpc.FutureTimeoutError):
                pass
            finally:
                # A pending future keeps a connectivity watcher on the channel, whose thread raises "Channel
                # closed" once the caller closes it: cancel it rather than leave it behind.
                ready.cancel()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout_s:g} s")
            time.sleep(0.1)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _call(self, timeout_s: float | None) -> dict[str, Any]:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        return {"timeout": timeout, "metadata": self.metadata}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
