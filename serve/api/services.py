"""The lmforge.v1 servicers: Generation, Scoring and Model, over a Backend.

Each method is plain translation (serve/api/convert.py) around one Backend call; admission, request
parsing and error-to-status mapping happen in serve/api/handlers.py for all of them alike.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from serve.api import convert
from serve.api._gen.lmforge.v1 import generation_pb2, model_pb2, scoring_pb2
from serve.backends.base import Backend
from serve.types import InvalidRequestError, RequestOutput

log = logging.getLogger(__name__)


class RequestIds:
    """Engine-side request ids: the client's id is echoed back but never trusted to be unique."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def new(self, client_id: str, kind: str) -> tuple[str, str]:
        """(the id echoed to the client, the backend's unique id)."""
        n = next(self._counter)
        echoed = convert.request_id(client_id, f"{kind}-{n}")
        return echoed, f"{echoed}@{n}"


class GenerationService:
    def __init__(self, backend: Backend, ids: RequestIds | None = None) -> None:
        self.backend = backend
        self.ids = ids or RequestIds()
        self._context_len: int | None = None

    def _max_model_len(self) -> int:
        if self._context_len is None:
            self._context_len = self.backend.model_info().max_model_len
        return self._context_len

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> generation_pb2.GenerateResponse:
        builder, stream = self._start(request)
        async with contextlib.aclosing(stream):
            async for out in stream:
                builder.add(out)
        return builder.whole()

    async def GenerateStream(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        builder, stream = self._start(request)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield builder.delta(out)

    def _start(self, request: generation_pb2.GenerateRequest,
               ) -> tuple[convert.ResponseBuilder, AsyncIterator[RequestOutput]]:
        echoed, internal = self.ids.new(request.request_id, "gen")
        params = convert.sampling_params(request.sampling)
        prompt_field, prompt_ids = convert.prompt_token_ids(request, self.backend, "prompt")
        if len(prompt_ids) >= self._max_model_len():  # refused here: a huge prompt never reaches the engine thread
            raise InvalidRequestError(prompt_field, f"has {len(prompt_ids)} tokens; the model's context is "
                                                    f"{self._max_model_len()}, leaving no room to generate: shorten it")
        log.debug("generate %s (%s, %d prompt tokens)", internal, prompt_field, len(prompt_ids))
        stream = self._errors_named(self.backend.generate(internal, prompt_ids, params, priority=request.priority),
                                    prompt_field)
        return convert.ResponseBuilder(echoed, prompt_ids), stream

    @staticmethod
    async def _errors_named(stream: AsyncIterator[RequestOutput], prompt_field: str) -> AsyncIterator[RequestOutput]:
        """The backend validates at admission (first delta); its field names become proto paths."""
        async with contextlib.aclosing(stream):
            try:
                async for out in stream:
                    yield out
            except InvalidRequestError as err:
                raise convert.api_error(err, prompt_field) from None


class ScoringService:
    def __init__(self, backend: Backend, ids: RequestIds | None = None) -> None:
        self.backend = backend
        self.ids = ids or RequestIds()

    async def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext,
                    ) -> scoring_pb2.ScoreResponse:
        echoed, internal = self.ids.new(request.request_id, "score")
        loglikelihood, rolling = convert.score_queries(request)
        result = await self.backend.score(internal, loglikelihood, rolling, priority=request.priority)
        return convert.score_response(result, echoed, with_tokens=request.return_token_logprobs)


class ModelService:
    def __init__(self, backend: Backend, lmforge_version: str) -> None:
        self.backend = backend
        self.lmforge_version = lmforge_version

    async def GetModelInfo(self, request: model_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext,
                           ) -> model_pb2.ModelInfo:
        return convert.model_info(self.backend.model_info(), self.lmforge_version)

    async def Tokenize(self, request: model_pb2.TokenizeRequest, context: grpc.aio.ServicerContext,
                       ) -> model_pb2.TokenizeResponse:
        _, token_ids = convert.prompt_token_ids(request, self.backend, "input")
        return model_pb2.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(self, request: model_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext,
                         ) -> model_pb2.DetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return model_pb2.DetokenizeResponse(text=self.backend.detokenize(request.token_ids, skip_special_tokens=skip))
