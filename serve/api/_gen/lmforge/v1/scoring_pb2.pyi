from serve.api._gen.lmforge.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoglikelihoodQuery(_message.Message):
    __slots__ = ("context", "continuations")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATIONS_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.TextOrTokens
    continuations: _containers.RepeatedCompositeFieldContainer[_common_pb2.TextOrTokens]
    def __init__(self, context: _Optional[_Union[_common_pb2.TextOrTokens, _Mapping]] = ..., continuations: _Optional[_Iterable[_Union[_common_pb2.TextOrTokens, _Mapping]]] = ...) -> None: ...

class RollingQuery(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: _common_pb2.TextOrTokens
    def __init__(self, text: _Optional[_Union[_common_pb2.TextOrTokens, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("loglikelihood", "rolling", "return_token_logprobs", "request_id", "priority")
    LOGLIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    loglikelihood: _containers.RepeatedCompositeFieldContainer[LoglikelihoodQuery]
    rolling: _containers.RepeatedCompositeFieldContainer[RollingQuery]
    return_token_logprobs: bool
    request_id: str
    priority: int
    def __init__(self, loglikelihood: _Optional[_Iterable[_Union[LoglikelihoodQuery, _Mapping]]] = ..., rolling: _Optional[_Iterable[_Union[RollingQuery, _Mapping]]] = ..., return_token_logprobs: _Optional[bool] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ContinuationScore(_message.Message):
    __slots__ = ("logprob", "is_greedy", "num_tokens", "tokens")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    is_greedy: bool
    num_tokens: int
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, logprob: _Optional[float] = ..., is_greedy: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class LoglikelihoodResult(_message.Message):
    __slots__ = ("continuations",)
    CONTINUATIONS_FIELD_NUMBER: _ClassVar[int]
    continuations: _containers.RepeatedCompositeFieldContainer[ContinuationScore]
    def __init__(self, continuations: _Optional[_Iterable[_Union[ContinuationScore, _Mapping]]] = ...) -> None: ...

class RollingScore(_message.Message):
    __slots__ = ("logprob", "is_greedy", "num_tokens", "num_windows", "tokens")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    is_greedy: bool
    num_tokens: int
    num_windows: int
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, logprob: _Optional[float] = ..., is_greedy: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., num_windows: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "loglikelihood", "rolling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGLIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    ROLLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    loglikelihood: _containers.RepeatedCompositeFieldContainer[LoglikelihoodResult]
    rolling: _containers.RepeatedCompositeFieldContainer[RollingScore]
    def __init__(self, request_id: _Optional[str] = ..., loglikelihood: _Optional[_Iterable[_Union[LoglikelihoodResult, _Mapping]]] = ..., rolling: _Optional[_Iterable[_Union[RollingScore, _Mapping]]] = ...) -> None: ...
